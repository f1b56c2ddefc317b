"""Datasets and the input pipeline."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from kosmos2_jax.data import crop
from kosmos2_jax.data.build import build
from kosmos2_jax.data.example_random import ExampleRandom
from kosmos2_jax.data.examples import BadRecord, ExampleConfig, grit_example
from kosmos2_jax.format.images import normalize_pixels
from kosmos2_jax.data.pipeline import END_OF_SPLIT, SOURCE_KINDS, Pipeline, Source, _Reader, _tfds_records
from kosmos2_jax.data.spans import select_spans
from kosmos2_jax.data.synthetic import make_example
from kosmos2_jax.format.processor import Kosmos2Processor
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
from kosmos2_jax.train.trainer import source_examples


@pytest.fixture(scope="session")
def tfds_dir(shapes_tfds, tmp_path_factory):
    d = tmp_path_factory.mktemp("grit_tfds")
    builder = build(str(REPO / "data" / "grit"), str(d), manual_dir=str(REPO / "data" / "grit" / "dummy_data"))
    return shapes_tfds, builder


@pytest.fixture(scope="session")
def small_processor(small_spm):
    return Kosmos2Processor(Kosmos2Tokenizer.from_file(small_spm), image_size=32, num_image_tokens=8)


def _pipe(tfds_root, processor, **kw):
    source = Source("shapes", "grit", data_dir=str(tfds_root / "shapes" / "grounded" / "1.0.0"))
    args = dict(batch_size=4, seed=7, shuffle_buffer=16, num_workers=2)
    args.update(kw)
    return Pipeline([source], processor, ExampleConfig(seq_len=48, grounded_prob=0.5), **args)


# --- builders -----------------------------------------------------------------------------------
def test_shapes_builder(tfds_dir):
    import tensorflow_datasets as tfds

    root, _ = tfds_dir
    builder = tfds.builder_from_directory(str(root / "shapes" / "grounded" / "1.0.0"))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 60, "validation": 10, "test": 10}
    ex = next(iter(builder.as_dataset(split="train").take(1).as_numpy_iterator()))
    ref = make_example(0, "train", int(ex["key"].decode().split("-")[1]))
    assert ex["caption"].decode() == ref["caption"]
    np.testing.assert_array_equal(ex["ref_exps"], ref["ref_exps"])
    refexp = tfds.builder_from_directory(str(root / "shapes" / "refexp" / "1.0.0"))
    item = next(iter(refexp.as_dataset(split="test").take(1).as_numpy_iterator()))
    assert item["box"].shape == (4,) and item["expression"]


def test_synthetic_examples_are_seeded_and_boxes_are_exact():
    a, b = make_example(0, "train", 5), make_example(0, "train", 5)
    assert a["caption"] == b["caption"] and a["image"] == b["image"]
    assert make_example(0, "test", 5)["image"] != a["image"]
    for i in range(30):
        rec = make_example(0, "train", i)
        image = np.asarray(Image.open(__import__("io").BytesIO(rec["image"])))
        for row in rec["noun_chunks"]:
            x1, y1, x2, y2 = (row[2:6] * 128).round().astype(int)
            assert rec["caption"][int(row[0]):int(row[1])].split()[-1].rstrip("s") in ("circle", "square", "triangle")
            inside = image[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3)
            assert len(inside) > 0


def test_synthetic_images_cli_writes_a_split_s_images(tmp_path, capsys):
    from kosmos2_jax.data import synthetic

    out = tmp_path / "examples"
    assert synthetic.main(["images", "--split", "test", "--num", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test-0.png", "test-1.png", "test-2.png"]
    assert (out / "test-1.png").read_bytes() == make_example(0, "test", 1)["image"]  # the dataset's test images
    assert synthetic.main(["images", "--num", "1", "--out", str(out)]) == 2  # never overwritten silently
    assert "--overwrite" in capsys.readouterr().err and len(list(out.iterdir())) == 3


def test_grit_builder_skips_and_counts_bad_images(tfds_dir):
    _, builder = tfds_dir
    assert builder.info.splits["train"].num_examples == 4 + 5 + 2  # good + bad-box/caption + tar records
    assert builder.info.metadata["skipped_records"] == {"missing image": 1, "undecodable image": 2}


# --- boxes and spans ----------------------------------------------------------------------------
def test_crop_remap_hand_cases():
    # 200x100 image -> shorter side 50 -> 100x50 -> crop 50x50 at left=25
    assert crop.shorter_side_resize_shape(200, 100, 50) == (100, 50)
    assert crop.center_crop_offsets(100, 50, 50) == (25, 0)
    boxes = np.array([[0.25, 0.0, 0.75, 1.0],    # exactly the crop -> the whole image
                      [0.0, 0.0, 0.5, 0.5],      # half visible (x 0..50 -> 25..50 after crop): 50% kept
                      [0.0, 0.0, 0.2, 1.0],      # x 0..20 of 100, crop starts at 25: invisible
                      [0.2, 0.0, 0.3, 1.0]])     # x 20..30 -> 5 of 10 px visible: 50%
    new, keep = crop.crop_boxes(boxes, 200, 100, 50)
    np.testing.assert_allclose(new[0], [0, 0, 1, 1])
    np.testing.assert_allclose(new[1], [0, 0, 0.5, 0.5])
    assert keep.tolist() == [True, True, False, True]
    _, keep = crop.crop_boxes(np.array([[0.2, 0.0, 0.26, 1.0], [0.2, 0.0, 0.2625, 1.0]]), 200, 100, 50)
    assert keep.tolist() == [False, True]  # 1/6 visible is dropped; exactly 20% survives


def test_span_selection():
    caption = "a dog in a field of flowers"
    exps = np.array([[0, 27, .1, .1, .5, .5, .9], [9, 27, .2, .2, .9, .9, .8], [20, 27, .3, .3, .4, .4, .7],
                     [0, 27, .6, .6, .7, .7, .66], [0, 5, .1, .1, .2, .2, .5]])
    spans = select_spans(caption, exps, exps, "expression")
    assert spans == [(0, 27, [(.1, .1, .5, .5), (.6, .6, .7, .7)])]  # contained spans and low scores dropped
    chunks = np.array([[0, 5, .1, .1, .5, .5, .9], [9, 16, .2, .2, .9, .9, .8], [20, 27, .3, .3, .4, .4, .6]])
    assert [s[:2] for s in select_spans(caption, chunks, exps, "noun_chunk")] == [(0, 5), (9, 16)]


# --- examples -----------------------------------------------------------------------------------
def _record(**changes):
    rec = make_example(0, "train", 3)
    rec.update(changes)
    return rec


def test_grit_example_equals_hf_processor(processor, hf_processor):
    rec = make_example(0, "train", 1)  # "a black square to the left of two orange triangles"
    ex = grit_example(rec, processor, ExampleConfig(seq_len=160, grounded_prob=1.0, box_formula="hf"),
                      np.random.default_rng(0))
    spans = select_spans(rec["caption"], rec["noun_chunks"], rec["ref_exps"], "expression")
    text, pos = "<grounding>", 0
    for start, end, _ in spans:
        text += rec["caption"][pos:start] + f"<phrase>{rec['caption'][start:end]}</phrase>"
        pos = end
    text += rec["caption"][pos:]
    image = Image.open(__import__("io").BytesIO(rec["image"]))
    hf = hf_processor(text=text, images=image, bboxes=[[tuple(map(float, b)) for b in s[2]] for s in spans],
                      add_eos_token=True)
    n = len(hf["input_ids"])
    assert ex["input_ids"][:n].tolist() == hf["input_ids"] and (ex["input_ids"][n:] == 1).all()
    assert ex["image_embeds_position_mask"][:n].tolist() == hf["image_embeds_position_mask"]
    # uint8 from the pipeline, CLIP-normalized on the device by the trainer (same function, jnp)
    assert ex["pixel_values"].dtype == np.uint8
    np.testing.assert_allclose(normalize_pixels(ex["pixel_values"]), hf["pixel_values"][0].transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_allclose(normalize_pixels(ex["pixel_values"], jnp), normalize_pixels(ex["pixel_values"]), atol=1e-6)


@pytest.mark.parametrize("changes, reason", [
    (dict(caption=""), "empty caption"),
    (dict(image=b""), "missing image"),
    (dict(image=b"\xff\xd8\xff garbage"), "undecodable image"),
    (dict(ref_exps=np.array([[0, 5, np.nan, .1, .5, .5, .9]], np.float32)), "bad box or span"),
    (dict(ref_exps=np.array([[0, 5, .6, .1, .5, .5, .9]], np.float32)), "bad box or span"),
    (dict(ref_exps=np.array([[0, 5, .5, .1, .5, .5, .9]], np.float32)), "bad box or span"),
    (dict(ref_exps=np.array([[0, 5, .1, .1, 1.5, .5, .9]], np.float32)), "bad box or span"),
    (dict(ref_exps=np.array([[0, 500, .1, .1, .5, .5, .9]], np.float32)), "bad box or span"),
])
def test_bad_records_raise_bad_record(small_processor, changes, reason):
    rec = _record(**changes)
    if "image" in changes and changes["image"].startswith(b"\xff\xd8"):
        full = make_example(0, "train", 3)["image"]
        rec["image"] = full[: len(full) // 3]  # truncated PNG
    with pytest.raises(BadRecord) as err:
        grit_example(rec, small_processor, ExampleConfig(seq_len=48), np.random.default_rng(0))
    assert err.value.reason == reason


def test_loss_and_image_masks(small_processor):
    ex = grit_example(make_example(0, "train", 1), small_processor, ExampleConfig(seq_len=64, grounded_prob=1.0),
                      np.random.default_rng(0))
    tok = small_processor.tokenizer
    ids = ex["input_ids"].tolist()
    assert ids[:2] == [tok.bos_id, tok.image_id] and ids[10] == tok.end_image_id and ids[11] == tok.grounding_id
    assert ex["image_embeds_position_mask"].tolist()[:11] == [0, 0] + [1] * 8 + [0]
    n = int(ex["attention_mask"].sum())
    assert ex["loss_mask"].tolist() == [0] * 11 + [1] * (n - 11) + [0] * (64 - n)
    assert ids[n - 1] == tok.eos_id and tok.phrase_id in ids


# --- pipeline -----------------------------------------------------------------------------------
def test_pipeline_is_deterministic_and_resumes_exactly(tfds_dir, small_processor):
    root, _ = tfds_dir
    a = _pipe(root, small_processor)
    first = [next(a) for _ in range(6)]
    b = _pipe(root, small_processor)
    for x in first:
        y = next(b)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    grounded = sum(int((x["input_ids"] == small_processor.tokenizer.grounding_id).any(axis=1).sum()) for x in first)
    assert 0 < grounded < 24  # both forms occur with p = 0.5
    c = _pipe(root, small_processor)
    for _ in range(3):
        next(c)
    state = c.state()
    assert state["index"] == 12  # read ahead (in tasks of 8 examples) but not returned: replayed
    for per_task in (8, 3):  # how examples are grouped into pool tasks does not change the stream
        d = _pipe(root, small_processor, state=state, examples_per_task=per_task)
        for x in first[3:]:
            y = next(d)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    one_split = [list(_pipe(root, small_processor, repeat=False, examples_per_task=k)) for k in (1, 7)]
    assert len(one_split[0]) == len(one_split[1]) > 1
    for x, y in zip(*one_split):  # 60 records: the last task of 7 is a partial one
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    e = _pipe(root, small_processor, seed=8)
    assert not np.array_equal(next(e)["input_ids"], first[0]["input_ids"])


def test_example_random_is_a_pure_function_and_uniform():
    def draws(seed, index, stream):
        rng = ExampleRandom(seed, index, stream)
        return [rng.random() for _ in range(4)]

    assert draws(0, 5, 1) == draws(0, 5, 1)
    assert len({tuple(draws(*key)) for key in [(0, 5, 1), (1, 5, 1), (0, 6, 1), (0, 5, 0)]}) == 4
    rng = ExampleRandom(3, 7, 1)
    u = np.asarray([rng.random() for _ in range(20000)])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    counts = np.bincount([rng.integers(5) for _ in range(20000)], minlength=5)
    assert counts.min() > 3700 and counts.max() < 4300  # 4000 each
    firsts = np.asarray([ExampleRandom(0, i, 1).random() for i in range(20000)])  # across examples too
    assert abs(firsts.mean() - 0.5) < 0.01 and abs((firsts < 0.25).mean() - 0.25) < 0.01
    with pytest.raises(ValueError):
        rng.integers(0)


def test_record_reader_order_errors_and_end_before_teardown():
    """The background reader keeps the order, re-raises reading errors in the consumer, and ends the
    stream at `END_OF_SPLIT` without waiting for the source's teardown."""
    import time

    def failing():
        yield from range(3)
        raise OSError("truncated file")

    for chunk in (1, 2, 16):  # records cross the queue `chunk` at a time
        reader = _Reader(failing(), ahead=2, chunk=chunk)
        assert [next(reader) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="truncated file"):
            next(reader)
        with pytest.raises(StopIteration):
            next(reader)
        assert list(_Reader(iter(range(7)), ahead=4, chunk=chunk)) == list(range(7))

    def slow_teardown():
        try:
            yield from range(5)
            yield END_OF_SPLIT
        finally:
            time.sleep(3)

    start = time.perf_counter()
    assert list(_Reader(slow_teardown())) == list(range(5))
    assert time.perf_counter() - start < 2


def test_pipeline_close_stops_its_threads(tfds_dir, small_processor):
    pipe = _pipe(tfds_dir[0], small_processor)
    next(pipe)
    reader = pipe._records["shapes"]._thread
    pipe.close()
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_host_shards_are_disjoint_and_cover_the_split(tfds_dir):
    root, _ = tfds_dir
    source = Source("shapes", "grit", data_dir=str(root / "shapes" / "grounded" / "1.0.0"))
    keys = [[r["key"] for r in _tfds_records(source, 0, i, 2, 0, 8, repeat=False)] for i in range(2)]
    assert set(keys[0]).isdisjoint(keys[1])
    assert len(keys[0]) + len(keys[1]) == 60 and len(set(keys[0]) | set(keys[1])) == 60


def test_mixture_with_text_source(tfds_dir, small_processor, tmp_path):
    root, _ = tfds_dir
    (tmp_path / "lines.txt").write_text("\n".join(f"a text line about {i} circles" for i in range(50)))
    sources = [Source("shapes", "grit", data_dir=str(root / "shapes" / "grounded" / "1.0.0"), weight=3),
               Source("text", "text", path=str(tmp_path / "lines.txt"), weight=1)]
    pipe = Pipeline(sources, small_processor, ExampleConfig(seq_len=48), batch_size=50, seed=0)
    batch = next(pipe)
    text_rows = int((batch["has_image"] == 0).sum())
    assert 5 < text_rows < 25  # ~ 1/4 of 50
    assert not batch["image_embeds_position_mask"][batch["has_image"] == 0].any()


def test_bad_records_are_counted_and_limit_stops_the_pipeline(tfds_dir, small_processor):
    root, builder = tfds_dir
    source = Source("grit", "grit", data_dir=builder.data_dir)
    pipe = Pipeline([source], small_processor, ExampleConfig(seq_len=48), batch_size=6, seed=0, repeat=False,
                    max_bad_fraction=1.0, shuffle_buffer=1)
    rows = sum(len(b["input_ids"]) for b in pipe)
    assert rows == 6 and dict(pipe.bad_counts) == {"empty caption": 1, "bad box or span": 4}
    strict = Pipeline([source], small_processor, ExampleConfig(seq_len=48), batch_size=2, seed=0,
                      max_bad_fraction=0.2, min_records_for_bad_check=5)
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        for _ in range(20):
            next(strict)


def test_missing_dataset_is_a_clear_error(small_processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared tfds dataset"):
        Pipeline([Source("x", "grit", data_dir=str(tmp_path / "nope"))], small_processor, ExampleConfig(), 2)


@pytest.mark.parametrize("folder, config, splits", [
    ("refcoco", "refcoco", {"val": 2, "testA": 2}), ("flickr30k_entities", None, {"val": 1})])
def test_grounding_builders_on_dummy_data(folder, config, splits, tmp_path):
    """MDETR annotation files -> GRIT-style records (fine-tuning data), missing images counted."""
    import tensorflow_datasets as tfds

    from kosmos2_jax.data.build import build

    builder = build(str(REPO / "data" / folder), str(tmp_path), config=config,
                    manual_dir=str(REPO / "data" / folder / "dummy_data"))
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == splits
    records = list(tfds.as_numpy(builder.as_dataset(split="val")))
    if folder == "refcoco":
        assert builder.info.metadata["skipped_records"]["val"] == {"missing image": 1}
        rec = next(r for r in records if r["caption"] == b"red square on the left")
        np.testing.assert_allclose(rec["noun_chunks"], [[0, 22, 4 / 64, 6 / 48, 24 / 64, 18 / 48, 1.0]], rtol=1e-6)
        assert (rec["width"], rec["height"]) == (64, 48)
    else:
        (rec,) = records
        spans = [tuple(r[:2]) for r in rec["noun_chunks"]]
        assert spans == [(0, 14), (0, 14), (20, 31), (40, 51)]  # "Two young guys" has two boxes


# --- instruction data -------------------------------------------------------------------------------
def test_instruction_sequence_loss_on_answers_only(small_processor):
    from kosmos2_jax.data.instruct import instruction_sequence

    tok = small_processor.tokenizer
    turns = [("Question: what is red? Answer:", "a circle"), ("Question: and blue? Answer:", "two squares")]
    seq = instruction_sequence(small_processor, turns)
    ids, loss = seq.input_ids.tolist(), seq.loss_mask.tolist()
    answers = tok.encode("a circle") + tok.encode("two squares") + [tok.eos_id]
    assert [i for i, m in zip(ids, loss) if m] == answers
    assert ids[:2] == [tok.bos_id, tok.image_id] and seq.image_embeds_position_mask.tolist()[2:10] == [1] * 8
    p1 = tok.encode("Question: what is red? Answer:")
    assert ids[11:11 + len(p1)] == p1 and not any(loss[:11 + len(p1)])


def test_llava_turns():
    from kosmos2_jax.data.instruct import llava_turns

    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many squares?"}, {"from": "gpt", "value": "Two."}]
    assert llava_turns(conv) == [("Question: What colour is the circle? Answer:", "Red."),
                                 ("Question: How many squares? Answer:", "Two.")]
    assert llava_turns([{"from": "gpt", "value": "orphan"}]) == []


def test_grounded_instruction_turns_cover_both_directions_and_templates():
    from kosmos2_jax.data.instruct import REG_TEMPLATES, grounded_instruction_turn

    from kosmos2_jax.format.grounding import box_to_patch_pair, object_string

    obj = object_string([box_to_patch_pair((0.0, 0.0, 0.5, 0.5), 32, "train")])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        prompt, answer = grounded_instruction_turn("a red circle", [(0.0, 0.0, 0.5, 0.5)], 32, rng)
        if prompt.startswith("<grounding>"):
            assert prompt == "<grounding><phrase>a red circle</phrase>"
            assert answer == obj
            seen.add("box")
        else:
            (question, prefix), = [t for t in REG_TEMPLATES if prompt.startswith(t[0].split("{obj}")[0])]
            assert question.format(obj=obj) == prompt
            assert answer == f"{prefix} a red circle."
            seen.add(question)
    assert len(seen) == 1 + len(REG_TEMPLATES)


def test_instruction_sources_in_the_pipeline(tfds_dir, small_processor, tmp_path):
    root, _ = tfds_dir
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "a.jpg")
    conversations = [{"id": str(i), "image": "a.jpg" if i % 4 else "missing.jpg",
                      "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                        {"from": "gpt", "value": "red"}]} for i in range(40)]
    (tmp_path / "llava.json").write_text(json.dumps(conversations))
    sources = [Source("llava", "llava", path=str(tmp_path / "llava.json"), data_dir=str(tmp_path / "images")),
               Source("grounded", "grit_instruct", data_dir=str(root / "shapes" / "grounded" / "1.0.0"))]
    pipe = Pipeline(sources, small_processor, ExampleConfig(seq_len=48), batch_size=16, seed=0, num_workers=1,
                    max_bad_fraction=0.5)
    batch = next(pipe)
    tok = small_processor.tokenizer
    answer = tok.encode("red") + [tok.eos_id]
    rows = [r for r in range(16) if [i for i, m in zip(batch["input_ids"][r], batch["loss_mask"][r]) if m] == answer]
    assert rows, "some rows are the LLaVA conversation, with loss only on its answer"
    assert pipe.bad_counts["missing image"] > 0  # a quarter of the conversations point at no image
    assert all(batch["has_image"])


def _language_files(tmp_path):
    flan = [{"inputs": f"Count to {i}:", "targets": " ".join(str(k) for k in range(1, i + 2))} for i in range(30)]
    flan[3]["targets"] = ""  # an instruction with no answer
    lines = [json.dumps(r) for r in flan] + ["not json"]
    (tmp_path / "flan.jsonl").write_text("\n".join(lines) + "\n")
    unnatural = [{"instruction": f"Name colour {i}.", "instances": [
        {"instruction_with_input": f"Name colour {i}. Input: sky", "input": "sky", "output": "blue"},
        {"instruction_with_input": f"Name colour {i}. Input: grass", "input": "grass", "output": "green"}]}
        for i in range(15)]
    (tmp_path / "unnatural.jsonl").write_text("\n".join(json.dumps(r) for r in unnatural) + "\n")
    return tmp_path / "flan.jsonl", tmp_path / "unnatural.jsonl"


def test_language_instructions_have_their_loss_on_the_answer(small_processor, tmp_path):
    """FLANv2 (inputs/targets) and Unnatural Instructions (one example per instance) as released:
    `<s> prompt answer </s>`, no image, loss on the answer and `</s>` only; bad lines counted by
    source and reason."""
    from kosmos2_jax.data.instruct import load_language_instructions

    flan, unnatural = _language_files(tmp_path)
    assert load_language_instructions(str(unnatural), "unnatural_instructions")[:2] == [
        {"prompt": "Name colour 0. Input: sky", "answer": "blue"}, {"prompt": "Name colour 0. Input: grass", "answer": "green"}]
    tok = small_processor.tokenizer
    for kind, path, (prompt, answer) in [("flan", flan, ("Count to 0:", "1")),
                                         ("unnatural_instructions", unnatural, ("Name colour 0. Input: sky", "blue"))]:
        pipe = Pipeline([Source(kind, kind, path=str(path))], small_processor, ExampleConfig(seq_len=48), batch_size=8,
                        seed=0, num_workers=1, max_bad_fraction=0.5, repeat=False)
        batch = next(pipe)
        expected = [tok.bos_id] + tok.encode(prompt) + tok.encode(answer) + [tok.eos_id]
        n = len(expected)
        assert batch["input_ids"][0, :n].tolist() == expected
        assert batch["loss_mask"][0, :n].tolist() == [0] * (1 + len(tok.encode(prompt))) + [1] * (len(tok.encode(answer)) + 1)
        assert batch["loss_mask"][0, n:].sum() == 0 and batch["image_embeds_position_mask"].sum() == 0
        assert not batch["has_image"].any()
        if kind == "flan":
            rows = [next(pipe) for _ in range(3)]  # the rest of the file: the bad lines come up
            assert dict(pipe.bad_by_source) == {"flan: instruction with no answer": 1, "flan: not a JSON object": 1}
            assert sum(len(b["input_ids"]) for b in [batch, *rows]) == 29 + 1 - 1  # 30 good lines, one without answer
        pipe.close()


def test_mixture_follows_the_configured_weights_and_resumes_exactly(tfds_dir, small_processor, tmp_path):
    """Four kinds at weights 4:3:2:1 (relative): the examples drawn from each over 200 batches
    are within 3 points of the weights; every kind mixed with packing resumes at batch 3
    exactly as the uninterrupted run."""
    root, _ = tfds_dir
    grounded = str(root / "shapes" / "grounded" / "1.0.0")
    flan, unnatural = _language_files(tmp_path)
    (tmp_path / "lines.txt").write_text("\n".join(f"a text line about {i} squares" for i in range(50)) + "\n")
    sources = [Source("train", "grit", data_dir=grounded, weight=4), Source("text", "text", path=str(tmp_path / "lines.txt"), weight=3),
               Source("flan", "flan", path=str(flan), weight=2),
               Source("unnatural", "unnatural_instructions", path=str(unnatural), weight=1)]
    pipe = Pipeline(sources, small_processor, ExampleConfig(seq_len=48), batch_size=8, seed=3, num_workers=2,
                    shuffle_buffer=16, max_bad_fraction=0.5)
    counted = sum(source_examples(next(pipe), len(sources)) for _ in range(200))  # the trainer's per-source count
    state = pipe.state()
    drawn = state["positions"]
    total = sum(drawn.values())
    shares = {name: drawn[name] / total for name in drawn}
    pipe.close()
    for name, weight in [("train", 0.4), ("text", 0.3), ("flan", 0.2), ("unnatural", 0.1)]:
        assert abs(shares[name] - weight) < 0.03, shares
    for i, source in enumerate(sources, start=1):  # every example returned is counted for its own source
        bad = sum(n for key, n in state["bad_by_source"].items() if key.startswith(f"{source.name}: "))
        assert counted[i] == drawn[source.name] - bad, (source.name, counted, drawn, state["bad_by_source"])
    assert counted[0] == 0 and counted.sum() == 200 * 8

    config = ExampleConfig(seq_len=96, grounded_prob=0.5)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "a.jpg")
    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "llava.json").write_text(json.dumps([{"id": str(i), "image": "a.jpg", "conversations": conversation}
                                                     for i in range(10)]))
    documents = REPO / "data" / "interleaved" / "dummy_data"
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"image": "a.jpg", "expression": f"the red {i}",
                                                             "box": [2, 3, 20 + i, 25]}) + "\n" for i in range(10)))
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": "a.jpg", "width": 40, "height": 30} for i in range(10)],
        "categories": [{"id": 1, "name": "red square"}],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 2, 10 + i, 8]} for i in range(10)]}))
    (tmp_path / "odvg.jsonl").write_text("".join(json.dumps({"filename": "a.jpg", "width": 40, "height": 30, "grounding": {
        "caption": f"a red square {i}", "regions": [{"bbox": [0, 0, 20, 20 + i], "phrase": "a red square"}]}}) + "\n"
        for i in range(10)))
    images = str(tmp_path / "images")
    mixed = sources + [Source("refs", "refexp", path=str(tmp_path / "refs.jsonl"), data_dir=images),
                       Source("coco", "coco", path=str(tmp_path / "coco.json"), data_dir=images),
                       Source("odvg", "odvg", path=str(tmp_path / "odvg.jsonl"), data_dir=images),
                       Source("grounded_instruct", "grit_instruct", data_dir=grounded, weight=1),
                       Source("caption", "caption", data_dir=grounded, weight=1),
                       Source("llava", "llava", path=str(tmp_path / "llava.json"), data_dir=str(tmp_path / "images")),
                       Source("web", "interleaved", path=str(documents), data_dir=str(documents / "images"), weight=2)]
    assert {s.kind for s in mixed} == set(SOURCE_KINDS)  # every kind there is
    make = lambda state=None: Pipeline(mixed, small_processor, config, batch_size=4, seed=5, num_workers=2, shuffle_buffer=16,
                                       max_bad_fraction=0.5, pack=True, pack_max_images=3, state=state)
    whole = make()
    batches = [next(whole) for _ in range(6)]
    whole.close()
    present = set(np.unique(np.concatenate([b["source_ids"].ravel() for b in batches[3:]])))
    assert present >= {1, 2, 8}, present  # the resumed part has GRIT, text and documents at least
    first = make()
    for _ in range(3):
        next(first)
    state = first.state()
    first.close()
    resumed = make(state)
    for expected in batches[3:]:
        got = next(resumed)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    resumed.close()


def test_caption_sources_read_grit_records_as_plain_pairs(tfds_dir, small_processor):
    root, _ = tfds_dir
    source = Source("caption", "caption", data_dir=str(root / "shapes" / "grounded" / "1.0.0"))
    pipe = Pipeline([source], small_processor, ExampleConfig(seq_len=48, grounded_prob=1.0), batch_size=8, seed=0,
                    num_workers=1)
    batch = next(pipe)
    pipe.close()
    tok = small_processor.tokenizer
    assert batch["has_image"].all() and (batch["image_embeds_position_mask"].sum(axis=1) == 8).all()
    assert not np.isin(batch["input_ids"], [tok.grounding_id, tok.phrase_id]).any()
    assert not (batch["input_ids"] >= tok.first_location_id).any()


def test_coyo_metadata_becomes_a_caption_source(small_processor, tmp_path):
    """COYO-700M's Parquet as published (`id, url, text, width, height, ...`) with img2dataset's
    images named by id: `data/grit` builds it, and a `caption` source reads it as plain pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "coyo" / "images").mkdir(parents=True)
    ids = [101, 102, 103]
    for i in ids:
        Image.new("RGB", (48, 40), (20 * (i - 100), 90, 160)).save(tmp_path / "coyo" / "images" / f"{i}.jpg")
    pq.write_table(pa.table({"id": ids, "url": [f"http://c/{i}.jpg" for i in ids],
                             "text": ["a red circle", "two blue squares", "a green star"],
                             "width": [48] * 3, "height": [40] * 3, "clip_similarity_vitb32": [0.3] * 3}),
                   tmp_path / "coyo" / "part-00000.parquet")
    builder = build(str(REPO / "data" / "grit"), str(tmp_path / "tfds"), manual_dir=str(tmp_path / "coyo"))
    source = Source("caption", "caption", data_dir=builder.data_dir)
    pipe = Pipeline([source], small_processor, ExampleConfig(seq_len=48), batch_size=3, seed=0, num_workers=1,
                    shuffle_buffer=1, repeat=False)
    batch = next(pipe)
    pipe.close()
    tok = small_processor.tokenizer
    texts = sorted(tok.decode([int(t) for t, m in zip(row, mask) if m and t != tok.eos_id])
                   for row, mask in zip(batch["input_ids"], batch["loss_mask"]))
    assert texts == ["a green star", "a red circle", "two blue squares"] and batch["has_image"].all()
