"""COCO detection, ODVG and referring-expression JSONL sources (data/annotations.py): small files in
those formats -> exact records (pixel boxes normalized by each image's size, crowd and empty boxes
dropped), skips counted by reason, and the pipeline's tokens equal HF's processor on the same text
and boxes."""

import json

import numpy as np
import pytest
from PIL import Image

from kosmos2_jax.data.annotations import load_items
from kosmos2_jax.data.examples import ExampleConfig
from kosmos2_jax.data.pipeline import Pipeline, Source

SIZES = {"a.png": (200, 100), "b.png": (64, 64), "c.png": (50, 80)}


@pytest.fixture
def annotated(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, size in SIZES.items():
        Image.new("RGB", size, (90, 40, 200)).save(images / name)
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
                   {"id": 3, "file_name": "missing.png", "width": 10, "height": 10},
                   {"id": 4, "file_name": "c.png", "width": 50, "height": 80},
                   {"id": 5, "file_name": "c.png", "width": 50, "height": 80}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 20, 50, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 0, 60, 100], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [150, 50, 40, 40], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1},  # crowd: dropped
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [32, 32, 64, 64]},  # clipped to the image
            {"id": 6, "image_id": 2, "category_id": 2, "bbox": [5, 5, 0, 10]},  # no area: dropped
            {"id": 7, "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5]},  # its image is missing
            {"id": 8, "image_id": 4, "category_id": 99, "bbox": [0, 0, 5, 5]},  # unknown category
            {"id": 9, "image_id": 5, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}  # crowd only
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    odvg = [
        {"filename": "a.png", "height": 100, "width": 200,
         "detection": {"instances": [{"bbox": [10, 20, 60, 60], "label": 2, "category": "dog"},
                                     {"bbox": [100, 0, 160, 100], "label": 1, "category": "person"}]}},
        {"filename": "b.png", "height": 64, "width": 64,
         "grounding": {"caption": "a dog next to a person", "regions": [
             {"bbox": [0, 0, 32, 32], "phrase": "a dog", "tokens_positive": [[0, 5]]},
             {"bbox": [32, 16, 64, 48], "phrase": "a person"}]}},
        {"filename": "c.png", "height": 80, "width": 50,
         "detection": {"instances": [{"bbox": [0, 0, 5, 5], "label": 7}]}},  # no category name
        {"filename": "c.png", "height": 80, "width": 50,
         "grounding": {"caption": "a cat", "regions": [{"bbox": [0, 0, 5, 5], "phrase": "a bird"}]}}]
    (tmp_path / "train.odvg.jsonl").write_text("\n".join(map(json.dumps, odvg)) + "\nnot json\n")
    refexp = [{"image": "a.png", "expression": "the dog on the left", "box": [10, 20, 60, 60]},
              {"image": "c.png", "expression": "the cat", "boxes": [[0, 40, 50, 80]], "width": 50, "height": 80},
              {"image": "gone.png", "expression": "nothing", "box": [0, 0, 1, 1]},
              {"image": "b.png", "box": [0, 0, 1, 1]}]  # no expression
    (tmp_path / "refs.jsonl").write_text("\n".join(map(json.dumps, refexp)) + "\n")
    return tmp_path


def _rows(*spans):
    return np.asarray([[s, e, *box, 1.0] for s, e, boxes in spans for box in boxes], np.float32)


def test_coco_records(annotated):
    items = load_items(str(annotated / "instances_train.json"), "coco", str(annotated / "images"))
    good = [r for r in items if "bad" not in r]
    assert [r.get("bad") for r in items if "bad" in r] == ["unknown category", "no boxes"]
    assert [r["caption"] for r in good] == ["dog, person", "person", "person"]  # the last: missing.png
    np.testing.assert_allclose(good[0]["ref_exps"], _rows((0, 3, [[0.05, 0.2, 0.3, 0.6], [0.75, 0.5, 0.95, 0.9]]),
                                                          (5, 11, [[0.5, 0.0, 0.8, 1.0]])), atol=1e-6)
    np.testing.assert_allclose(good[1]["ref_exps"], _rows((0, 6, [[0.5, 0.5, 1.0, 1.0]])))
    assert (good[0]["width"], good[0]["height"]) == (200, 100)


def test_odvg_and_refexp_records(annotated):
    odvg = load_items(str(annotated / "train.odvg.jsonl"), "odvg", str(annotated / "images"))
    assert [r.get("bad") for r in odvg] == [None, None, "unknown category", "phrase not in caption", "bad annotation"]
    assert odvg[0]["caption"] == "dog, person"
    np.testing.assert_allclose(odvg[0]["ref_exps"], _rows((0, 3, [[0.05, 0.2, 0.3, 0.6]]),
                                                          (5, 11, [[0.5, 0.0, 0.8, 1.0]])), atol=1e-6)
    np.testing.assert_allclose(odvg[1]["ref_exps"], _rows((0, 5, [[0, 0, 0.5, 0.5]]), (14, 22, [[0.5, 0.25, 1, 0.75]])))
    refs = load_items(str(annotated / "refs.jsonl"), "refexp", str(annotated / "images"))
    assert [r.get("bad") for r in refs] == [None, None, "missing image", "bad annotation"]
    np.testing.assert_allclose(refs[0]["ref_exps"], _rows((0, 19, [[0.05, 0.2, 0.3, 0.6]])), atol=1e-6)
    np.testing.assert_allclose(refs[1]["ref_exps"], _rows((0, 7, [[0.0, 0.5, 1.0, 1.0]])))


CASES = {  # kind, file -> (the good records' grounded texts and boxes in order, skips by reason)
    "coco": ("instances_train.json",
             [("<grounding><phrase>dog</phrase>, <phrase>person</phrase>",
               [[(0.05, 0.2, 0.3, 0.6), (0.75, 0.5, 0.95, 0.9)], [(0.5, 0.0, 0.8, 1.0)]]),
              ("<grounding><phrase>person</phrase>", [[(0.5, 0.5, 1.0, 1.0)]])],
             {"unknown category": 1, "no boxes": 1, "missing image": 1}),
    "odvg": ("train.odvg.jsonl",
             [("<grounding><phrase>dog</phrase>, <phrase>person</phrase>",
               [[(0.05, 0.2, 0.3, 0.6)], [(0.5, 0.0, 0.8, 1.0)]]),
              ("<grounding><phrase>a dog</phrase> next to <phrase>a person</phrase>",
               [[(0.0, 0.0, 0.5, 0.5)], [(0.5, 0.25, 1.0, 0.75)]])],
             {"unknown category": 1, "phrase not in caption": 1, "bad annotation": 1}),
    "refexp": ("refs.jsonl",
               [("<grounding><phrase>the dog on the left</phrase>", [[(0.05, 0.2, 0.3, 0.6)]]),
                ("<grounding><phrase>the cat</phrase>", [[(0.0, 0.5, 1.0, 1.0)]])],
               {"missing image": 1, "bad annotation": 1}),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_the_pipeline_s_tokens_equal_hf_s_processor(annotated, processor, hf_processor, kind):
    name, expected, skips = CASES[kind]
    source = Source(kind, kind, path=str(annotated / name), data_dir=str(annotated / "images"))
    pipe = Pipeline([source], processor, ExampleConfig(seq_len=160, grounded_prob=1.0, box_formula="hf"),
                    batch_size=1, repeat=False, num_workers=1, min_records_for_bad_check=100)
    rows = list(pipe)
    assert len(rows) == len(expected) and dict(pipe.bad_counts) == skips
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    for row, (text, boxes) in enumerate(expected):
        hf = hf_processor(text=text, images=Image.new("RGB", (32, 32)), bboxes=boxes, add_eos_token=True)
        n = len(hf["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == hf["input_ids"], (kind, row)
        assert batch["image_embeds_position_mask"][row, :n].tolist() == hf["image_embeds_position_mask"]
    pipe.close()


def test_synthetic_referring_expressions_in_the_jsonl_format_and_the_refexp_task(tmp_path):
    """`data.synthetic refexp` writes the format the `refexp` source and evaluation task read
    (the LoRA demo's new words: "the scarlet shape" for the red one, in images of two colours)."""
    import subprocess
    import sys

    from conftest import REPO
    from kosmos2_jax.data.synthetic import SYNONYMS, make_example
    from kosmos2_jax.evaluation.tasks import TASKS

    out = tmp_path / "new_words"
    done = subprocess.run([sys.executable, "-m", "kosmos2_jax.data.synthetic", "refexp", "--split", "test", "--num",
                           "60", "--vocabulary", "synonyms", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(t) for t in (out / "test.jsonl").read_text().splitlines()]
    items = TASKS["refexp"].load(str(out), "test")
    assert len(items) == len(lines) > 4
    assert {it["phrase"] for it in items} <= {f"the {w} shape" for w in SYNONYMS.values()}
    first = lines[0]
    index = int(first["image"].split("-")[1].split(".")[0])
    record = make_example(0, "test", index)
    colour = {w: c for c, w in SYNONYMS.items()}[first["expression"].split()[1]]
    start = record["caption"].index(colour)  # the chunk that names this colour holds its one box
    row = next(r for r in record["noun_chunks"] if r[0] <= start < r[1])
    np.testing.assert_allclose(items[0]["target"], row[2:6], atol=1e-4)
    assert (out / "images" / first["image"]).is_file()
