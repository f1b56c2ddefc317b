"""GRIT construction: text stage (hand-checked cases), boxes (NMS, threshold), detectors, and the
build CLI locally and on Beam's DirectRunner."""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from kosmos2_jax.grit import box_selection
from kosmos2_jax.grit import text as text_lib
from kosmos2_jax.grit.stages import GritConfig, caption_problem
from grit_cases import CASES


@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip("spacy")
    try:
        return text_lib.load_spacy()
    except OSError as e:
        pytest.skip(str(e))


def _phrases(nlp, caption):
    result = text_lib.phrases_of(nlp(caption))
    keep = text_lib.keep_maximal([p.expression for p in result.phrases])
    return [(caption[p.start:p.end], ("*" if k else "") + caption[p.exp_start:p.exp_end])
            for p, k in zip(result.phrases, keep)], result


# --- text stage ---------------------------------------------------------------------------------
def test_paper_example_dog_in_a_field(nlp):
    got, _ = _phrases(nlp, "a dog in a field of flowers")
    assert got == [("a dog", "*a dog in a field of flowers"), ("a field", "a field of flowers"), ("flowers", "flowers")]


def test_grit_card_example_and_chunk_repair(nlp):
    caption = "a wire hanger with a paper cover that reads we heart our customers"
    doc = nlp(caption)
    # The parser limit the repair exists for: 'hanger' hangs on 'wire' as an amod.
    assert [(c.start_char, c.end_char) for c in doc.noun_chunks][0] == (0, 6)
    result = text_lib.phrases_of(doc)
    spans = [(p.chunk, p.expression) for p in result.phrases]
    assert spans[0] == ((0, 13), (0, 66))  # GRIT: chunk [0, 13], expression [0, 66]
    assert spans[1] == ((19, 32), (19, 66))  # GRIT: chunk [19, 32], expression [19, 66]
    assert result.abstract == 2  # 'that', 'we'
    assert text_lib.keep_maximal([e for _, e in spans]) == [True, False, False]


@pytest.mark.parametrize("caption,expected", CASES, ids=[c for c, _ in CASES])
def test_hand_checked_cases(nlp, caption, expected):
    got, _ = _phrases(nlp, caption)
    assert got == expected


def test_abstract_filter_reasons(nlp):
    from kosmos2_jax.grit.abstract import abstract_reason

    doc = nlp("love and freedom in the morning with 10 dollars and it")
    reasons = {c.root.text: abstract_reason(c.root) for c in doc.noun_chunks}
    assert reasons["love"] == "lemma" and reasons["freedom"] == "lemma"
    assert reasons["it"] == "pronoun"
    assert reasons["morning"] in ("entity", "lemma")
    assert reasons["dollars"] == "entity"
    custom = text_lib.phrases_of(nlp("a dog on a couch"), lemmas=frozenset({"couch"}))
    assert [p.chunk for p in custom.phrases] == [(0, 5)] and custom.abstract == 1


def test_keep_maximal():
    assert text_lib.keep_maximal([(0, 10), (2, 5), (2, 5), (8, 12), (0, 10)]) == [True, False, False, True, True]


def test_caption_checks():
    c = GritConfig()
    assert caption_problem("", c) == "skipped_empty_caption"
    assert caption_problem("   \n", c) == "skipped_empty_caption"
    assert caption_problem("a" * 1001, c) == "skipped_caption_too_long"
    assert caption_problem("一只猫坐在沙发上", c) == "skipped_non_english"
    assert caption_problem("Пёс на диване", c) == "skipped_non_english"
    assert caption_problem("a café in Paris", c) is None


# --- boxes --------------------------------------------------------------------------------------
def test_nms_hand_built():
    boxes = [(0, 0, 1, 1), (0, 0, 0.9, 0.9), (0.5, 0.5, 1, 1), (0, 0, 0.5, 0.5)]
    scores = [0.9, 0.95, 0.8, 0.7]
    # (0,0,.9,.9) wins; (0,0,1,1) has IoU .81 with it; the lower-right quarter .16/.90 = .18; the
    # upper-left quarter .25/.81 = .31.
    assert box_selection.nms(boxes, scores, 0.5) == [1, 2, 3]
    assert box_selection.nms(boxes, scores, 0.2) == [1, 2]
    assert box_selection.nms(boxes, scores, 0.1) == [1]
    assert box_selection.nms([(0, 0, 1, 1), (0, 0, 1, 1)], [0.5, 0.5], 0.5) == [0]  # tie: the first


def test_select_boxes_across_phrases_and_threshold():
    import collections

    counters = collections.Counter()
    detections = [
        [((0.1, 0.1, 0.5, 0.5), 0.9), ((0.6, 0.6, 0.9, 0.9), 0.65)],  # 0.65 is not > 0.65
        [((0.1, 0.1, 0.5, 0.52), 0.8),  # overlaps phrase 0's box: NMS is class-agnostic
         ((0.5, 0.0, 0.7, 0.2), 0.7)],
        [((float("nan"), 0, 1, 1), 0.9), ((0.5, 0.5, 0.2, 0.9), 0.9), ((0.1, 0.1, 1.5, 0.9), 0.9),
         ((-0.001, 0.0, 0.5, 1.0005), 0.99)],
    ]
    out = box_selection.select_boxes(detections, 0.5, 0.65, counters)
    assert out[0] == [((0.1, 0.1, 0.5, 0.5), 0.9)]
    assert out[1] == [((0.5, 0.0, 0.7, 0.2), 0.7)]
    assert out[2] == [((0.0, 0.0, 0.5, 1.0), 0.99)]  # clipped
    assert counters["boxes_detected"] == 8
    assert counters["boxes_invalid_nan"] == counters["boxes_invalid_inverted"] == 1
    assert counters["boxes_invalid_out_of_range"] == 1
    assert counters["removed_by_nms"] == 1 and counters["below_threshold"] == 1


# --- the build, end to end ------------------------------------------------------------------------
CAPTIONS = {
    "dog": "a dog in a field of flowers",
    "hanger": "a wire hanger with a paper cover that reads we heart our customers",
    "cat": "a cat and a dog on a couch",
    "empty": "   ",
    "chinese": "一只猫坐在沙发上",
    "long": "a dog " * 200,
    "missing": "a red car parked in front of a house",
    "corrupt": "a bird on a branch",
    "tiny": "a bird on a branch",
    "abstract": "love is forever",
    "weak": "a boat on a lake",
}


def _make_input(root):
    images = root / "images"
    images.mkdir(parents=True)
    for key in CAPTIONS:
        if key == "missing":
            continue
        path = images / f"{key}.jpg"
        if key == "corrupt":
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            Image.new("RGB", (8, 8) if key == "tiny" else (96, 64), (30, 120, 200)).save(path)
    with open(root / "captions.jsonl", "w") as f:
        for key, caption in CAPTIONS.items():
            f.write(json.dumps({"key": key, "caption": caption, "url": f"http://x/{key}.jpg"}) + "\n")
    det = {
        "dog": {"a dog": [[0.1, 0.2, 0.5, 0.9, 0.9]], "a field": [[0, 0.5, 1, 1, 0.8]], "flowers": [[0.6, 0.6, 0.9, 0.9, 0.7]]},
        "hanger": {"a wire hanger": [[0.02, 0.03, 0.96, 0.97, 0.675]], "a paper cover": [[0.02, 0.31, 0.96, 0.96, 0.79]],
                   "our customers": [[float("nan"), 0, 1, 1, 0.9]]},
        "cat": {"a cat": [[0.0, 0.0, 0.4, 0.4, 0.9], [0.01, 0.0, 0.4, 0.41, 0.8]], "a dog": [[0.5, 0.5, 0.9, 0.9, 0.95]],
                "a couch": [[0.0, 0.3, 1.0, 1.0, 0.5]]},
        "weak": {"a boat": [[0.1, 0.1, 0.3, 0.3, 0.4]], "a lake": [[0.6, 0.2, 0.3, 0.9, 0.99]]},
    }
    with open(root / "detections.jsonl", "w") as f:
        for key, d in det.items():
            f.write(json.dumps({"key": key, "detections": d}) + "\n")
    return root


def _build(tmp_path, runner, *extra):
    from kosmos2_jax.grit.build import main

    src = tmp_path / "in"
    if not src.exists():
        _make_input(src)
    out = tmp_path / f"out_{runner}"
    rc = main(["--input", str(src / "captions.jsonl"), "--out", str(out), "--detector", "precomputed",
               "--detector_path", str(src / "detections.jsonl"), "--runner", runner, "--batch_size", "3", *extra])
    assert rc == 0
    return out


def test_build_local_records_and_counters(nlp, tmp_path):
    from kosmos2_jax.grit.records import read_records

    out = _build(tmp_path, "local")
    records = {r["key"]: r for r in read_records(str(out))}
    assert sorted(records) == ["cat", "dog", "hanger"]
    dog = records["dog"]
    assert dog["width"] == 96 and dog["height"] == 64 and dog["url"] == "http://x/dog.jpg"
    assert [r[:2] for r in dog["noun_chunks"]] == [[0, 5], [9, 16], [20, 27]]
    assert dog["ref_exps"] == [[0, 27, 0.1, 0.2, 0.5, 0.9, 0.9]]  # only the whole phrase, with a dog's box
    hanger = records["hanger"]
    assert [r[:2] for r in hanger["noun_chunks"]] == [[0, 13], [19, 32]]
    assert [r[:2] for r in hanger["ref_exps"]] == [[0, 66]]
    assert hanger["noun_chunks"][0][2:] == pytest.approx([0.02, 0.03, 0.96, 0.97, 0.675])
    cat = records["cat"]  # NMS removed a cat's second box; the couch is below 0.65
    assert cat["noun_chunks"] == [[0, 5, 0, 0, 0.4, 0.4, 0.9], [10, 15, 0.5, 0.5, 0.9, 0.9, 0.95]]
    assert [r[:2] for r in cat["ref_exps"]] == [[0, 5], [10, 26]]
    assert os.path.isfile(out / "images" / "dog.jpg")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["captions_in"] == 11
    assert stats["skipped_empty_caption"] == 1 and stats["skipped_non_english"] == 1
    assert stats["skipped_caption_too_long"] == 1 and stats["skipped_missing_image"] == 1
    assert stats["skipped_corrupt_image"] == 1 and stats["skipped_tiny_image"] == 1
    assert stats["dropped_no_phrases"] == 1  # 'love is forever'
    assert stats["dropped_no_boxes"] == 1  # 'weak': one box too weak, one inverted
    assert stats["boxes_invalid_nan"] == 1 and stats["boxes_invalid_inverted"] == 1
    assert stats["removed_by_nms"] == 1 and stats["written"] == 3
    assert stats["expressions_contained"] == 3  # dog: 2, hanger: 1


def test_build_keep_contained_aligns_expressions(nlp, tmp_path):
    from kosmos2_jax.grit.records import read_records

    out = _build(tmp_path, "local", "--keep_contained")
    dog = {r["key"]: r for r in read_records(str(out))}["dog"]
    assert [r[:2] for r in dog["ref_exps"]] == [[0, 27], [9, 27], [20, 27]]


def test_build_records_feed_the_grit_dataset(nlp, tmp_path):
    """The output layout is what data/grit reads."""
    from kosmos2_jax.data.build import build

    out = _build(tmp_path, "local")
    build("data/grit", str(tmp_path / "tfds"), manual_dir=str(out))
    import tensorflow_datasets as tfds

    ds = tfds.builder("grit", data_dir=str(tmp_path / "tfds")).as_dataset(split="train")
    keys = sorted(x["key"].decode() for x in ds.as_numpy_iterator())
    assert keys == ["cat", "dog", "hanger"]


@pytest.mark.filterwarnings("ignore")
def test_beam_direct_runner_matches_local(nlp, tmp_path):
    pytest.importorskip("apache_beam")
    from kosmos2_jax.grit.records import read_records

    local = _build(tmp_path, "local")
    beam = _build(tmp_path, "DirectRunner")
    assert read_records(str(beam)) == read_records(str(local))
    assert json.loads((beam / "stats.json").read_text()) == json.loads((local / "stats.json").read_text())
    assert sorted(os.listdir(beam / "images")) == sorted(os.listdir(local / "images"))


def test_build_errors(tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--detector", "precomputed",
              "--detector_path", "x", "--runner", "local"])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert main(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--detector", "hf", "--runner", "local"]) == 2
    assert "needs --detector_path" in capsys.readouterr().err


def test_webdataset_tar_input(tmp_path):
    import tarfile

    from kosmos2_jax.grit.records import read_inputs

    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in [("000001.jpg", buf.getvalue()), ("000001.json", json.dumps({"key": "000001", "url": "u"}).encode()),
                           ("000001.txt", b"a dog")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (items,) = list(read_inputs(str(tmp_path)))
    assert items["key"] == "000001" and items["caption"] == "a dog" and items["image"] == buf.getvalue()


# --- detector backends ----------------------------------------------------------------------------
def _tiny_owlvit(directory):
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.OwlViTConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, **small),
                                       vision_config=dict(image_size=64, patch_size=16, **small), projection_dim=32)
    import torch

    torch.manual_seed(0)
    size = {"height": 64, "width": 64}
    transformers.OwlViTForObjectDetection(config).save_pretrained(directory / "model")
    transformers.OwlViTProcessor(image_processor=transformers.OwlViTImageProcessor(size=size, crop_size=size),
                                 tokenizer=tok).save_pretrained(directory / "model")
    return str(directory / "model")


def test_hf_detector_plumbing_on_random_owlvit(tmp_path):
    from kosmos2_jax.grit.detectors import HFDetector

    det = HFDetector(_tiny_owlvit(tmp_path), min_score=0.0)
    images = [Image.new("RGB", (80, 60), "red"), Image.new("RGB", (50, 70), "blue")]
    long_phrase = "a very long phrase with far more words than the sixteen token text limit of the encoder"
    out = det.detect(images, [["a dog", long_phrase], ["cat"]], ["a", "b"])
    assert [len(per) for per in out] == [2, 1]
    found = [pair for per in out for pairs in per for pair in pairs]
    assert found, "a random detector at min_score 0 returns boxes"
    for box, score in found:
        assert len(box) == 4 and 0.0 <= score <= 1.0 and all(math.isfinite(v) for v in box)


def test_kosmos2_detector_matches_single_prompt_forward(tmp_path, small_spm):
    from conftest import save_tiny_checkpoint

    from kosmos2_jax.grit.detectors import Kosmos2Detector

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    det = Kosmos2Detector(ckpt, small_spm, batch_size=4)
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 30, 200)),
              Image.new("RGB", (40, 40), (20, 200, 30))]
    phrases = [["a red circle", "two blue squares to the left"], ["a blue square"], ["a green star", "a star", "it"]]
    detections = det.detect(images, phrases, ["a", "b", "c"])  # 6 prompts across 3 records: batches of 4 and 2
    assert [len(d) for d in detections] == [2, 1, 3]
    # fixed device shapes: one image batch, text batches of 4 rows at a few bucketed lengths
    assert {shape for kind, shape in det.compiled_shapes if kind == "image"} == {(4, 28, 28, 3)}
    assert all(shape[0] == 4 and shape[1] % 16 == 0 for kind, shape in det.compiled_shapes if kind == "text")
    for image, names, per in zip(images, phrases, detections):
        _check_alone(det, image, names, per)


def _check_alone(det, image, phrases, per):
    for name, pairs in zip(phrases, per):
        # Recompute one prompt alone, without padding: same location tokens and score.
        inputs = det.processor([f"<grounding><phrase>{name}</phrase><object>"], images=[image])
        logits = np.asarray(det.model.apply({"params": det.params}, inputs["pixel_values"], inputs["input_ids"],
                                            inputs["attention_mask"], inputs["image_embeds_position_mask"])[0, -1])
        lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        loc = lp[det.first_loc:det.first_loc + det.num_loc]
        ul = int(loc.argmax())
        ids = np.concatenate([inputs["input_ids"], [[det.first_loc + ul]]], 1).astype(np.int32)
        logits2 = np.asarray(det.model.apply({"params": det.params}, inputs["pixel_values"], ids, np.ones_like(ids),
                                             np.pad(inputs["image_embeds_position_mask"], ((0, 0), (0, 1))))[0, -1])
        lp2 = logits2 - np.log(np.exp(logits2 - logits2.max()).sum()) - logits2.max()
        loc2 = lp2[det.first_loc:det.first_loc + det.num_loc]
        lr = int(loc2.argmax())
        from kosmos2_jax.format.grounding import patch_pair_to_box

        ((box, score),) = pairs
        assert box == pytest.approx(patch_pair_to_box(ul, lr, det.processor.num_bins))
        assert score == pytest.approx(math.exp((loc[ul] + loc2[lr]) / 2), rel=1e-4)


def test_default_nms_keeps_the_released_example_pair():
    """GRIT's example record kept two boxes with IoU 0.688: the default threshold must keep them."""
    hanger, cover = (0.0194, 0.0276, 0.9593, 0.9695), (0.0196, 0.3105, 0.9622, 0.9603)
    from kosmos2_jax.evaluation.metrics import iou

    assert iou(hanger, cover) == pytest.approx(0.688, abs=1e-3)
    out = box_selection.select_boxes([[(hanger, 0.6752)], [(cover, 0.7930)]])
    assert out == [[(hanger, 0.6752)], [(cover, 0.7930)]]


def test_missing_detections_file(tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    _make_input(tmp_path / "in")
    assert main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--detector", "precomputed",
                 "--detector_path", str(tmp_path / "dets.jsonl"), "--runner", "local"]) == 2
    assert "dets.jsonl" in capsys.readouterr().err


def test_pack_phrases():
    from kosmos2_jax.grit.detectors import pack_phrases

    assert pack_phrases([3, 4, 5, 2], 8) == [[0, 1], [2, 3]]
    assert pack_phrases([10, 2], 8) == [[0], [1]]  # too long alone: its own prompt
    assert pack_phrases([], 8) == []


def _tiny_grounding_dino(directory):
    transformers = pytest.importorskip("transformers")
    import torch

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "dog", "cat", "red", "circle", "the", "on",
             "##s", "very", "long"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(str(directory / "vocab.txt"))
    text = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, max_text_len=16,
        num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, use_timm_backbone=False, backbone=None,
        use_pretrained_backbone=False)
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(directory / "model")
    image_processor = transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    transformers.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(directory / "model")
    return str(directory / "model")


def test_hf_detector_plumbing_on_random_grounding_dino(tmp_path):
    from kosmos2_jax.grit.detectors import HFDetector

    det = HFDetector(_tiny_grounding_dino(tmp_path), min_score=0.0)
    # 16-token text limit: these six phrases need several prompts, each scored on its own tokens.
    phrases = ["a dog", "a red circle", "the cats on a very long dog", "a cat", "red dogs", "the circle"]
    (per,) = det.detect([Image.new("RGB", (80, 60), "red")], [phrases], ["k"])
    assert [len(p) for p in per] == [10] * 6  # every query, for every phrase, at min_score 0
    for pairs in per:
        for box, score in pairs:
            assert all(isinstance(v, float) and math.isfinite(v) for v in box) and 0.0 <= score <= 1.0
    json.dumps(per)  # plain floats: records can be written as they are


def test_precomputed_boxes_without_a_score_name_the_line(nlp, tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    src = tmp_path / "in"
    _make_input(src)
    lines = (src / "detections.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["detections"]["a wire hanger"] = [[0.02, 0.03, 0.96, 0.97]]  # x1, y1, x2, y2: a common format
    lines[1] = json.dumps(row)
    (src / "detections.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    rc = main(["--input", str(src / "captions.jsonl"), "--out", str(tmp_path / "o"), "--detector", "precomputed",
               "--detector_path", str(src / "detections.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not (tmp_path / "o").exists(), err
    assert f"detections.jsonl:2: 'a wire hanger': [0.02, 0.03, 0.96, 0.97] is not [x1, y1, x2, y2, score]" in err


def test_list_phrases_names_the_keys_of_a_detections_file(nlp, tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    src = tmp_path / "in"
    _make_input(src)
    out = tmp_path / "phrases.jsonl"
    assert main(["--input", str(src / "captions.jsonl"), "--list_phrases", str(out)]) == 0
    listed = {r["key"]: r["phrases"] for r in map(json.loads, out.read_text().splitlines())}
    detections = {r["key"]: r["detections"] for r in map(json.loads, (src / "detections.jsonl").read_text().splitlines())}
    assert listed["dog"] == list(detections["dog"])  # the detections file was keyed by these phrases
    assert set(detections) <= set(listed)
    assert main(["--input", str(src / "captions.jsonl"), "--list_phrases", str(out)]) == 2  # never overwritten


def test_runner_names(nlp, tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    src = tmp_path / "in"
    _make_input(src)
    args = ["--input", str(src / "captions.jsonl"), "--detector", "precomputed", "--detector_path",
            str(src / "detections.jsonl")]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o"), "--runner", "Nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--runner 'Nope': not local, dask" in err and "DataflowRunner" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    # Beam's name for the Dask runner is --runner dask (here on a local cluster of 1 worker)
    assert main([*args, "--out", str(tmp_path / "d"), "--runner", "DaskRunner", "--dask_workers", "1"]) == 0
    assert "to build on dask" in capsys.readouterr().err
