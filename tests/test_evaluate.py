import json
import os
import time

import numpy as np

import pytest

from conftest import save_tiny_checkpoint
from kosmos2_jax import evaluate
from kosmos2_jax.evaluation.metrics import first_box_hit, iou


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),            # touching edges
    ((0, 0, 2, 2), (0.5, 0.5, 1.5, 1.5), 0.25),   # contained
    ((0, 0, 1, 1), (0.5, 0, 1.5, 1), 1 / 3),
    ((0.5, 0.5, 0.5, 0.9), (0, 0, 1, 1), 0.0),    # zero area
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)


def test_first_box_rule():
    target = (0.1, 0.1, 0.5, 0.5)
    assert first_box_hit([(0.1, 0.1, 0.5, 0.5), (0.9, 0.9, 1.0, 1.0)], target)
    assert not first_box_hit([(0.9, 0.9, 1.0, 1.0), (0.1, 0.1, 0.5, 0.5)], target)  # only the first counts
    assert not first_box_hit([], target)  # a parse failure is a miss
    assert first_box_hit([(0.1, 0.1, 0.45, 0.5)], target)  # IoU 0.875
    assert first_box_hit([(0.0, 0.0, 0.25, 0.5)], (0.0, 0.0, 0.5, 0.5))  # IoU exactly 0.5 counts (>=)
    assert not first_box_hit([(0.0, 0.0, 0.24, 0.5)], (0.0, 0.0, 0.5, 0.5))


def test_shapes_task_end_to_end(shapes_tfds, small_spm, tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    out = tmp_path / "eval" / "results.json"
    rc = evaluate.main(["--task", "shapes", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", small_spm,
                        "--data_dir", str(shapes_tfds / "shapes" / "refexp" / "1.0.0"), "--split", "test",
                        "--max_examples", "5", "--batch_size", "4", "--out", str(out), "--draw", "2"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["count"] == 5
    assert all({"expression", "target", "predicted", "iou", "hit", "text"} <= set(p) for p in result["predictions"])
    hits = [p["hit"] for p in result["predictions"]]  # the accuracy is the share of hits, each IoU >= 0.5
    assert result["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    assert all(p["hit"] == (p["iou"] >= 0.5) for p in result["predictions"])
    assert (tmp_path / "eval" / "example_1.png").is_file()


# --- the paper's tasks -----------------------------------------------------------------------------
from kosmos2_jax.evaluation.metrics import merge_boxes, recall_at_k, recall_at_k_merged  # noqa: E402
from kosmos2_jax.evaluation.vqa import normalize_answer, vqa_accuracy  # noqa: E402


def test_recall_at_k_any_box_vs_merged():
    targets = [(0.0, 0.0, 0.2, 0.2), (0.8, 0.8, 1.0, 1.0)]  # two people far apart
    pred_one = [(0.8, 0.8, 1.0, 1.0)]
    assert recall_at_k(pred_one, targets, 1)  # ANY-BOX: matching one of them is a hit
    assert merge_boxes(targets) == (0.0, 0.0, 1.0, 1.0)
    assert not recall_at_k_merged(pred_one, targets, 1)  # MERGED-BOX: the union box is what counts
    assert recall_at_k_merged([(0.0, 0.0, 1.0, 1.0)], targets, 1)
    ranked = [(0.4, 0.4, 0.6, 0.6), (0.0, 0.0, 0.2, 0.2)]
    assert not recall_at_k(ranked, targets, 1) and recall_at_k(ranked, targets, 5)
    # Fewer than k boxes generated: all of them are used, so R@5 = R@10 here.
    assert recall_at_k(ranked, targets, 10) == recall_at_k(ranked, targets, 5)
    assert not recall_at_k([(0.0, 0.0, 0.0, 0.0)], targets, 10)  # the parse-failure box is a miss


@pytest.mark.parametrize("raw, expected", [
    ("A dog", "dog"), ("the Two dogs.", "2 dogs"), ("an apple", "apple"),  # articles, number words, case
    ("yes!", "yes"), ("red, white", "red white"), ("1,000", "1000"), ("3.5", "3.5"),  # punctuation rules
    ("dont", "don't"), ("Its raining", "its raining"), ("isnt", "isn't"),  # contractions
    ("none", "0"), ("ten", "10"), (" eleven\n", "eleven"),
])
def test_vqa_normalization(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_caption_scores_equal_coco_eval_cap(tmp_path, monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import pycocoevalcap.eval

    class NoSpice:  # the official driver also runs SPICE, which downloads Stanford models
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    import shutil

    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap's tokenizer and METEOR need Java")
    from pycocoevalcap.eval import COCOEvalCap

    from kosmos2_jax.evaluation.captions import caption_scores

    refs = {1: ["A man riding a horse on a beach.", "a person rides a brown horse near the sea"],
            2: ["Two dogs play with a ball in the snow.", "dogs playing in snow"],
            3: ["A bowl of fruit on a wooden table.", "fresh fruit in a bowl"]}
    preds = {1: "a man riding a horse on the beach", 2: "two dogs playing in the snow", 3: "a table with food"}

    class FakeCoco:  # the two attributes COCOEvalCap reads
        def __init__(self, anns):
            self.imgToAnns = anns

        def getImgIds(self):
            return list(self.imgToAnns)

    coco = FakeCoco({i: [{"image_id": i, "caption": c} for c in cs] for i, cs in refs.items()})
    res = FakeCoco({i: [{"image_id": i, "caption": c}] for i, c in preds.items()})
    official = COCOEvalCap(coco, res)
    official.params = {"image_id": list(refs)}
    official.evaluate()
    ours = caption_scores(preds, refs)
    for k in ("Bleu_1", "Bleu_4", "METEOR", "CIDEr"):
        assert ours[k] == pytest.approx(official.eval[k], abs=1e-9), k


class _BigramModel:
    """logits[b, t] = table[ids[b, t]]: log p(next | current) set by hand."""

    def __init__(self, table):
        self.table = table

    def apply(self, variables, pixel_values, ids, mask, image_mask):
        import jax.numpy as jnp

        return jnp.asarray(self.table)[ids]


class _WordTokenizer:
    bos_id, pad_id = 0, 1
    vocab = {"the": 2, "cat": 3, "sat": 4, "dog": 5, "ran": 6}

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]


def test_loglik_picks_the_known_answer_and_sums_candidate_tokens():
    from kosmos2_jax.evaluation.loglik import candidate_logprobs, choose

    table = np.full((7, 7), -10.0, np.float32)
    table[3, 4] = 5.0  # after "cat": "sat" is likely
    table[3, 6] = 1.0
    model, tok = _BigramModel(table), _WordTokenizer()
    scores = candidate_logprobs(model, None, tok, "the cat", [" ran", " sat", " sat sat"])
    assert choose(scores) == 1
    logp = table[3] - np.log(np.exp(table[3]).sum())
    assert scores[1]["sum"] == pytest.approx(logp[4], abs=1e-5) and scores[1]["tokens"] == 1
    logp4 = table[4] - np.log(np.exp(table[4]).sum())
    assert scores[2]["sum"] == pytest.approx(logp[4] + logp4[4], abs=1e-5)
    assert scores[2]["mean"] == pytest.approx((logp[4] + logp4[4]) / 2, abs=1e-5)


def test_loglik_equals_full_forward(tmp_path, small_spm):
    from kosmos2_jax.evaluation.loglik import candidate_logprobs
    from kosmos2_jax.weights.hf import load_model
    from kosmos2_jax.format.tokenizer import tokenizer_for

    model, params = load_model(save_tiny_checkpoint(tmp_path / "ckpt", small_spm))
    tok = tokenizer_for(small_spm, model)
    context, candidates = "a red circle to the left of", [" two blue squares", " a green star on a grey background"]
    scores = candidate_logprobs(model, params, tok, context, candidates)
    for cand, got in zip(candidates, scores):
        ids = np.asarray([[tok.bos_id] + tok.encode(context + cand)], np.int32)
        n_ctx = 1 + len(tok.encode(context))
        logits = np.asarray(model.apply({"params": params}, None, ids, np.ones_like(ids), None)[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        direct = sum(logp[t - 1, ids[0, t]] for t in range(n_ctx, ids.shape[1]))
        assert got["sum"] == pytest.approx(direct, rel=1e-5)


def test_runner_resumes_without_recomputing(tmp_path):
    from kosmos2_jax.evaluation.runner import run_items

    items = [{"id": str(i), "x": i} for i in range(7)]
    calls = []

    def predict(batch, fail_after=None):
        calls.append([it["id"] for it in batch])
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # killed mid-way
        return [{"y": it["x"] ** 2} for it in batch]

    jsonl = str(tmp_path / "p.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_items(items, lambda b: predict(b, fail_after=2), jsonl, 2, log=None)
    with open(jsonl, "a") as f:
        f.write('{"id": "6", "y"')  # a torn line from the kill
    calls.clear()
    records = run_items(items, predict, jsonl, 2, log=None)
    assert calls == [["4", "5"], ["6"]]  # batches 1-2 were kept
    assert [r["y"] for r in records] == [i * i for i in range(7)]
    uninterrupted = run_items(items, predict, str(tmp_path / "q.jsonl"), 2, log=None)
    assert records == uninterrupted


# --- each task end to end on dummy data, with a random tiny model ---------------------------------
from eval_dummy_data import dummy_task_data as _dummy_task_data  # noqa: E402


@pytest.mark.parametrize("task, split, metric", [
    ("refcoco", "val", "accuracy"), ("refcocog", "val", "accuracy"), ("flickr30k_entities", "val", "R@1"),
    ("flickr30k_caption", "val", "CIDEr"), ("refcocog_reg", "val", "METEOR"), ("vqav2", "val2014", "accuracy"), ("language", "val", "COPA"),
])
def test_task_end_to_end_on_dummy_data(task, split, metric, tmp_path, small_spm):
    import shutil

    if (task.endswith("_caption") or task.endswith("_reg")) and shutil.which("java") is None:
        pytest.skip("caption metrics need Java")
    root = _dummy_task_data(task, tmp_path / "data")
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    out = tmp_path / "eval" / "results.json"
    args = ["--task", task, "--checkpoint", ckpt, "--tokenizer", small_spm, "--data_dir", str(root),
            "--split", split, "--batch_size", "2", "--out", str(out)]
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())
    assert metric in result["metrics"] and np.isfinite(result["metrics"][metric])
    assert len(result["predictions"]) == result["count"] > 0
    if task == "refcoco":
        assert result["missing_images"] == 1 and result["count"] == 3  # counted, not fatal
    if task == "refcocog_reg":
        assert result["count"] == 3 and result["missing_images"] == 1  # 4 expressions of 3 objects
        assert sorted(result["predictions"][0]["references"]) == ["red circle", "the round red one"]
    if task == "flickr30k_entities":
        assert result["count"] == 2 and "R@1/people" in result["metrics"]
    if task == "vqav2":
        server = json.loads((tmp_path / "eval" / "results.server.json").read_text())
        assert sorted(r["question_id"] for r in server) == [11, 12]
    # A rerun finds every prediction in the JSONL and recomputes nothing.
    assert evaluate.main(args) == 0
    assert json.loads(out.read_text())["metrics"] == result["metrics"]


def test_reg_few_shot_prompts(tmp_path, small_spm):
    """k-shot REG: k demonstrations from the train split (seeded per item, stored with it), then the
    query, as one interleaved sequence of k + 1 images."""
    from kosmos2_jax.evaluation.tasks import Context, RegTask
    from kosmos2_jax.weights.hf import load_model
    from kosmos2_jax.format.tokenizer import tokenizer_for
    from kosmos2_jax.format.processor import Kosmos2Processor

    root = _dummy_task_data("refcocog_reg", tmp_path / "data")
    task = RegTask(shots=2)
    items = task.load(str(root), "val")
    assert items == RegTask(shots=2).load(str(root), "val")  # deterministic
    train_objects = {("c.jpg", "the left cup"), ("d.jpg", "a tall man"), ("d.jpg", "the tall man in red"),
                     ("a.jpg", "small dog")}
    for it in items:
        assert len(it["shots"]) == 2 and len({s["image"] + str(s["target"]) for s in it["shots"]}) == 2
        assert all((s["image"], s["expression"]) in train_objects for s in it["shots"])
    model, params = load_model(save_tiny_checkpoint(tmp_path / "ckpt", small_spm))
    processor = Kosmos2Processor(tokenizer_for(small_spm, model), image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    ctx = Context(model, params, processor, image_dir=str(root / "images"))
    seen = []
    original = ctx.generate_interleaved
    ctx.generate_interleaved = lambda prompts, **kw: (seen.extend(prompts), original(prompts, **kw))[1]
    records = task.predict(ctx, items[:2])
    assert len(records) == 2 and all(isinstance(r["expression"], str) for r in records)
    first = seen[0]
    assert len(first) == 6  # (image, demonstration) x 2, then (query image, query)
    shot = items[0]["shots"][0]
    assert first[1] == (f"<phrase> It</phrase> is {shot['expression']}.", [tuple(shot["target"])])
    assert first[5] == ("<phrase> It</phrase> is", [tuple(items[0]["target"])])
    inputs = processor.interleaved(seen)
    assert inputs["pixel_values"].shape[1] == 3
    with pytest.raises(ValueError, match="needs 5 demonstration objects"):
        RegTask(shots=5).load(str(root), "val")


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="METEOR needs Java")
def test_reg_few_shot_end_to_end(tmp_path, small_spm):
    root = _dummy_task_data("refcocog_reg", tmp_path / "data")
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    out = tmp_path / "r.json"
    args = ["--task", "refcocog_reg", "--shots", "2", "--checkpoint", ckpt, "--tokenizer", small_spm,
            "--data_dir", str(root), "--split", "val", "--out", str(out)]
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "refcocog_reg_2shot" and result["count"] == 3 and result["missing_images"] == 1
    assert {"METEOR", "CIDEr"} <= set(result["metrics"])
    assert [len(p.get("shots", [])) for p in result["predictions"]] == [2, 2, 0]  # the last one's image is missing
    assert evaluate.main(["--task", "refcoco", "--shots", "2", *args[4:]]) == 2  # --shots is REG-only


def test_evaluate_bad_inputs(tmp_path, small_spm, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    common = ["--checkpoint", ckpt, "--tokenizer", small_spm, "--out", str(tmp_path / "r.json")]
    (tmp_path / "nothing").mkdir()
    assert evaluate.main(["--task", "refcoco", "--data_dir", str(tmp_path / "nothing"), "--split", "val", *common]) == 2
    assert "finetune_refcoco_val.json" in capsys.readouterr().err
    root = _dummy_task_data("refcoco", tmp_path / "data")
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(root / "images")
    assert evaluate.main(["--task", "refcoco", "--data_dir", str(root), "--split", "val", *common]) == 2
    assert "image folder not found" in capsys.readouterr().err


# --- language tasks from the tfds catalog ------------------------------------------------------
def test_language_converters_hand_built():
    from kosmos2_jax.evaluation.language_data import convert

    copa = convert("COPA", {"premise": b"The man broke his toe.", "question": b"cause", "choice1": b"He dropped a hammer.",
                            "choice2": b"He wore socks.", "label": 0}, 3)
    assert copa == {"id": "COPA-3", "task": "COPA", "label": 0, "context": "The man broke his toe because",
                    "candidates": [" he dropped a hammer.", " he wore socks."]}
    boolq = convert("BoolQ", {"passage": b"Cats are mammals.", "question": b"is a cat a mammal", "label": 1}, 0)
    assert boolq["context"] == "Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:"
    assert boolq["candidates"][boolq["label"]] == " yes"
    cb = convert("CB", {"premise": b"It rained.", "hypothesis": b"The ground is wet.", "label": 2}, 0)
    assert cb["candidates"][cb["label"]] == " Neither"
    wg = convert("Winogrande", {"sentence": b"The cup fit in the box because the _ was small.", "option1": b"cup",
                                "option2": b"box", "label": 0}, 0)
    assert wg["contexts"] == ["The cup fit in the box because the cup", "The cup fit in the box because the box"]
    assert wg["candidates"] == [" was small.", " was small."]
    text = "The trophy doesn't fit in the suitcase because it is too big."
    wsc = convert("Winograd", {"text": text.encode(), "pronoun_start": text.index(" it ") + 1,
                               "pronoun_end": text.index(" it ") + 3, "option1": b"the trophy",
                               "option2": b"the suitcase", "label": 0}, 0)
    assert wsc["contexts"][0] == "The trophy doesn't fit in the suitcase because the trophy"
    assert wsc["candidates"][0] == " is too big."
    hs = convert("HellaSwag", {"activity_label": b"Cooking", "context": b"A man cracks eggs [title] into a bowl.",
                               "endings": [b"He whisks them.", b"He flies."], "label": 0}, 0)
    assert hs["context"] == "Cooking: A man cracks eggs. into a bowl." and hs["candidates"][0] == " He whisks them."
    piqa = convert("PIQA", {"goal": b"open a jar", "sol1": b"twist the lid", "sol2": b"eat the lid", "label": 0}, 0)
    assert piqa["context"] == "Question: open a jar\nAnswer:" and piqa["candidates"][0] == " twist the lid"
    sc = convert("StoryCloze", {"context": [b"Ann was hungry.", b"She cooked."], "endings": [b"She ate.", b"She slept."],
                                "label": 0}, 0)
    assert sc["context"] == "Ann was hungry. She cooked." and sc["candidates"] == [" She ate.", " She slept."]


class _Online:
    def close(self):
        pass


def test_language_data_cli_on_mock_tfds_then_evaluate(tmp_path, small_spm, monkeypatch):
    import tensorflow_datasets as tfds

    from kosmos2_jax.evaluation import language_data as module
    from kosmos2_jax.evaluation.language_data import main as language_data

    monkeypatch.setattr(module.socket, "create_connection", lambda *a, **k: _Online())  # tfds is mocked
    out = tmp_path / "lang" / "validation.jsonl"
    with tfds.testing.mock_data(num_examples=3):
        assert language_data(["--out", str(out), "--tasks", "BoolQ", "CB", "PIQA", "HellaSwag"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["BoolQ"] * 3 + ["CB"] * 3 + ["PIQA"] * 3 + ["HellaSwag"] * 3
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    res = tmp_path / "r.json"
    assert evaluate.main(["--task", "language", "--checkpoint", ckpt, "--tokenizer", small_spm, "--data_dir",
                          str(out.parent), "--split", "validation", "--out", str(res)]) == 0
    assert set(json.loads(res.read_text())["metrics"]) == {"BoolQ", "CB", "PIQA", "HellaSwag"}


def test_language_data_offline_fails_fast_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from kosmos2_jax.evaluation import language_data as module

    def offline(address, timeout=None):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(module.socket, "create_connection", offline)
    out = tmp_path / "lang" / "validation.jsonl"
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        module.main(["--out", str(out), "--tasks", "BoolQ", "--data_dir", str(tmp_path / "tfds")])
    assert e.value.code == 2 and time.monotonic() - start < 30
    captured = capsys.readouterr()
    assert "BoolQ: tfds super_glue/boolq [validation] is not prepared in" in captured.out
    assert "downloading it from dl.fbaipublicfiles.com" in captured.out
    err = captured.err.strip()
    assert "\n" not in err and "BoolQ: cannot reach dl.fbaipublicfiles.com" in err and "--data_dir" in err, err
    assert not out.parent.exists() or not os.listdir(out.parent)
    with pytest.raises(SystemExit) as e:  # a manual download is named, not attempted
        module.main(["--out", str(out), "--tasks", "StoryCloze", "--data_dir", str(tmp_path / "tfds")])
    assert e.value.code == 2 and "needs a manual download" in capsys.readouterr().err


def test_per_candidate_contexts_score_each_pair(tmp_path, small_spm):
    from kosmos2_jax.evaluation.loglik import candidate_logprobs, pair_logprobs
    from kosmos2_jax.weights.hf import load_model
    from kosmos2_jax.format.tokenizer import tokenizer_for

    model, params = load_model(save_tiny_checkpoint(tmp_path / "ckpt", small_spm))
    tok = tokenizer_for(small_spm, model)
    pairs = [("a red circle", " to the left"), ("a blue square", " to the left")]
    both = pair_logprobs(model, params, tok, pairs)
    alone = [candidate_logprobs(model, params, tok, c, [x])[0] for c, x in pairs]
    assert [b["sum"] for b in both] == pytest.approx([a["sum"] for a in alone], rel=1e-5)
    assert both[0]["sum"] != pytest.approx(both[1]["sum"])


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    import io

    from kosmos2_jax.evaluation.runner import run_items

    log = io.StringIO()  # not a terminal: no \r updates, a line per tenth of the work
    run_items([{"id": i} for i in range(50)], lambda batch: [{"x": 1} for _ in batch], str(tmp_path / "p.jsonl"), 2,
              log=log)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10 and lines[-1].startswith("50/50 items"), lines
