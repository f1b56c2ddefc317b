"""The evaluation tasks: how each reads its data, prompts the model, and scores (reference §5).

Every task turns its annotation files into items (dicts with a unique `id`, JSON-able), predicts
a batch of items into JSON records (streamed to JSONL by `runner.run_items`), and scores the
records. Data layouts (all local; nothing is downloaded):

- `refcoco`, `refcoco+`, `refcocog`: MDETR's `finetune_{task}_{split}.json` in --data_dir (COCO
  format: images with `file_name`, `caption` = the expression, `width`, `height`; one annotation
  per image with `bbox` [x, y, w, h]); COCO train2014 images in --image_dir.
- `flickr30k_entities`: MDETR's `final_flickr_separateGT_{split}.json` in --data_dir (images with
  `caption`, `tokens_positive_eval` = the phrases' character spans, optional `phrase_types`;
  annotations with `bbox` and `tokens_positive`); Flickr30k images in --image_dir.
- `refcocog_reg`: the RefCOCOg files above; one item per object (image + box), all its
  expressions as references; k-shot (`--shots k`) draws demonstrations from the train split's file.
- `flickr30k_caption`, `coco_caption`: Karpathy's `dataset_flickr30k.json` / `dataset_coco.json`
  in --data_dir (images with `filename`, optional `filepath`, `split`, `sentences[].raw`).
- `vqav2`: `v2_OpenEnded_mscoco_{split}_questions.json` (+ `v2_mscoco_{split}_annotations.json`
  when scoring; without it only the server JSON is written); images `COCO_{split}_{id:012d}.jpg`.
- `language`: `{split}.jsonl` in --data_dir (or --data_dir is the file), one line per item:
  `{"id", "task", "context", "candidates": [...], "label": index}` (or `"contexts"`, one per
  candidate); text only. `python -m kosmos2_jax.evaluation.language_data` writes it from tfds.
- `shapes`: the synthetic `refexp` tfds folder as --data_dir.
"""

from __future__ import annotations

import collections
import json
import os
import zlib
from typing import Callable

import numpy as np

from kosmos2_jax.format.images import ImageError, open_image, to_rgb
from kosmos2_jax.evaluation.metrics import first_box_hit, iou, recall_at_k, recall_at_k_merged
from kosmos2_jax.utils.errors import UsageError

# The paper's numbers (v3, reference §3.4), printed beside ours.
PAPER = {
    "flickr30k_entities": {"val": {"R@1": 77.8, "R@5": 79.2, "R@10": 79.3}, "test": {"R@1": 78.7, "R@5": 80.1, "R@10": 80.1}},
    "refcoco": {"val": {"accuracy": 52.32}, "testA": {"accuracy": 57.42}, "testB": {"accuracy": 47.26}},
    "refcoco+": {"val": {"accuracy": 45.48}, "testA": {"accuracy": 50.73}, "testB": {"accuracy": 42.24}},
    "refcocog": {"val": {"accuracy": 60.57}, "test": {"accuracy": 61.65}},
    "flickr30k_caption": {"test": {"CIDEr": 66.7}},
    "refcocog_reg": {"test": {"METEOR": 12.2, "CIDEr": 60.3}},
    "refcocog_reg_2shot": {"test": {"METEOR": 13.8, "CIDEr": 62.2}},
    "refcocog_reg_4shot": {"test": {"METEOR": 14.1, "CIDEr": 62.3}},
    "vqav2": {"test-dev": {"accuracy": 45.6}},
    "language": {"test": {"StoryCloze": 72.0, "HellaSwag": 49.4, "Winograd": 69.1, "Winogrande": 55.6,
                          "PIQA": 72.9, "BoolQ": 62.0, "CB": 30.4, "COPA": 67.0}},
}


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _load_json(path: str, what: str):
    with open(_need(path, what)) as f:
        return json.load(f)


def _open_image(source):
    """RGB, or None for a missing or undecodable image (the item is counted as missing)."""
    try:
        return to_rgb(open_image(source))
    except ImageError:
        return None


class Context:
    """What predictions need: model, params, processor, settings."""

    def __init__(self, model, params, processor, image_dir: str = "", batch_size: int = 16,
                 decode_mode: str = "auto", tokens_per_call: int = 32, mesh=None):
        if mesh is not None:  # decode sharded over the mesh's devices
            from kosmos2_jax.inference.generate import shard_params

            params = shard_params(model, params, mesh)
        self.model, self.params, self.processor = model, params, processor
        self.image_dir, self.batch_size = image_dir, batch_size
        self.decoding = dict(decode_mode=decode_mode, tokens_per_call=tokens_per_call, mesh=mesh)

    def image(self, item):
        if "image_bytes" in item:
            return _open_image(item["image_bytes"])
        return _open_image(os.path.join(self.image_dir, item["image"]))

    def generate_text(self, prompts, images, max_new_tokens: int, num_beams: int = 1, no_repeat_ngram_size: int = 0,
                      bboxes=None):
        """(whole sequences, continuations after the prompt), decoded as `processor.decode` does (the
        grounding tags kept, `<s>`, `</s>`, padding and image slots dropped)."""
        inputs = self.processor(list(prompts), images=list(images) if images is not None else None,
                                bboxes=bboxes, padding_side="left")
        return self._generate(inputs, max_new_tokens, num_beams, no_repeat_ngram_size)

    def generate_interleaved(self, prompts, max_new_tokens: int, num_beams: int = 1, no_repeat_ngram_size: int = 0):
        """`generate_text` for interleaved prompts (`Kosmos2Processor.interleaved`: several images per row)."""
        return self._generate(self.processor.interleaved(prompts), max_new_tokens, num_beams, no_repeat_ngram_size)

    def _generate(self, inputs, max_new_tokens, num_beams, no_repeat_ngram_size):
        from kosmos2_jax.inference.generate import generate

        tok = self.processor.tokenizer
        out = generate(self.model, self.params, inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                       no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       **self.decoding)
        n = inputs["input_ids"].shape[1]
        full = [self.processor.decode(ids) for ids in out.sequences]
        new = [self.processor.decode(ids[n:]) for ids in out.sequences]
        return full, new


def _predict_with_images(ctx: Context, batch, run: Callable, missing_record: Callable):
    """Load each item's image; items whose image is missing get `missing_record(item)`."""
    images = [ctx.image(it) for it in batch]
    present = [i for i, im in enumerate(images) if im is not None]
    records = [None] * len(batch)
    if present:
        for i, rec in zip(present, run([batch[i] for i in present], [images[i] for i in present])):
            records[i] = rec
    return [r if r is not None else dict(missing_record(it), missing_image=True) for it, r in zip(batch, records)]


# --- grounding: RefCOCO/+/g, Flickr30k Entities, shapes -----------------------------------------
def _grounded_boxes(ctx: Context, items, images, prompts):
    full, _ = ctx.generate_text(prompts, images, max_new_tokens=16, no_repeat_ngram_size=3)
    out = []
    for item, text in zip(items, full):
        _, entities = ctx.processor.post_process_generation(text)
        name = item["phrase"].strip()
        boxes = [list(b) for n, _, bs in entities if n == name for b in bs]
        out.append((boxes, ctx.processor.post_process_generation(text, cleanup_and_extract=False)))
    return out


def _xywh_to_norm(bbox, width, height):
    x, y, w, h = map(float, bbox)
    return [x / width, y / height, (x + w) / width, (y + h) / height]


class RefExpTask:
    """Referring expression comprehension: prompt `<grounding><phrase>{expression}</phrase>`, the first
    box of the entity named by the expression, hit at IoU >= 0.5; a parse failure is a miss."""

    def __init__(self, name):
        self.name = name

    def load(self, data_dir, split):
        data = _load_json(os.path.join(data_dir, f"finetune_{self.name}_{split}.json"), f"{self.name} annotations")
        boxes = {a["image_id"]: a["bbox"] for a in data["annotations"]}
        return [{"id": str(im["id"]), "image": im["file_name"], "phrase": im["caption"],
                 "target": _xywh_to_norm(boxes[im["id"]], im["width"], im["height"])}
                for im in data["images"] if im["id"] in boxes]

    def predict(self, ctx, batch):
        def run(items, images):
            prompts = [f"<grounding><phrase>{it['phrase']}</phrase>" for it in items]
            return [{"expression": it["phrase"], "target": it["target"], "predicted": boxes[:1],
                     "iou": iou(boxes[0], it["target"]) if boxes else 0.0,
                     "hit": first_box_hit(boxes, it["target"]), "text": text}
                    for it, (boxes, text) in zip(items, _grounded_boxes(ctx, items, images, prompts))]
        return _predict_with_images(ctx, batch, run, lambda it: {"hit": False})

    def score(self, records):
        scored = [r for r in records if not r.get("missing_image")]
        return {"accuracy": 100.0 * sum(r["hit"] for r in scored) / max(len(scored), 1)}


class ShapesTask(RefExpTask):
    def __init__(self):
        super().__init__("shapes")

    def load(self, data_dir, split):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder_from_directory(data_dir)
        except Exception as e:
            raise FileNotFoundError(f"no prepared shapes refexp dataset at {data_dir!r}: {e}") from None
        if not {"expression", "box"} <= set(builder.info.features):
            raise UsageError(f"--data_dir {data_dir!r} is the shapes {builder.builder_config.name!r} dataset, not "
                             f"'refexp' (no expression and box per example): give .../shapes/refexp/VERSION")
        if split not in builder.info.splits:
            raise UsageError(f"--split {split!r}: {data_dir!r} has the splits {', '.join(builder.info.splits)}")
        items = []
        for i, ex in enumerate(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()):
            items.append({"id": str(i), "image_bytes": ex["image"], "phrase": ex["expression"].decode(),
                          "target": [float(v) for v in ex["box"]]})
        return items


class RefExpJsonlTask(RefExpTask):
    """Your own referring expressions: DATA_DIR/SPLIT.jsonl in data/annotations.py's `refexp` format
    (image, expression, pixel box), images in DATA_DIR/images (or --image_dir); the first box of
    each line is the target."""

    def __init__(self):
        super().__init__("refexp")

    def load(self, data_dir, split):
        from kosmos2_jax.data.annotations import load_items

        path = _need(os.path.join(data_dir, f"{split}.jsonl"), "refexp expressions")
        records = [r for r in load_items(path, "refexp", os.path.join(data_dir, "images")) if "bad" not in r]
        return [{"id": r["key"], "image": r["image_file"], "phrase": r["caption"],
                 "target": [float(v) for v in r["ref_exps"][0][2:6]]} for r in records]


class FlickrEntitiesTask:
    """Phrase grounding: one prompt per phrase, `<grounding>{caption before it} <phrase>{phrase}</phrase>`;
    R@1/5/10 under ANY-BOX (IoU >= 0.5 with any ground-truth box of the phrase), per phrase type;
    also MERGED-BOX R@1 for reference."""

    name = "flickr30k_entities"

    def load(self, data_dir, split):
        data = _load_json(os.path.join(data_dir, f"final_flickr_separateGT_{split}.json"), "Flickr30k Entities annotations")
        anns = collections.defaultdict(list)
        for a in data["annotations"]:
            anns[a["image_id"]].append(a)
        items = []
        for im in data["images"]:
            caption, types = im["caption"], im.get("phrase_types") or []
            for p, spans in enumerate(im["tokens_positive_eval"]):
                s, e = min(sp[0] for sp in spans), max(sp[1] for sp in spans)
                targets = [_xywh_to_norm(a["bbox"], im["width"], im["height"]) for a in anns[im["id"]]
                           if any(ts < e and s < te for ts, te in a["tokens_positive"])]
                items.append({"id": f"{im['id']}_{p}", "image": im["file_name"], "phrase": caption[s:e],
                              "prefix": caption[:s].strip(), "targets": targets, "caption": caption, "span": [s, e],
                              "type": types[p] if p < len(types) else "all"})
        return items

    def predict(self, ctx, batch):
        def run(items, images):
            prompts = [f"<grounding>{it['prefix']} <phrase>{it['phrase']}</phrase>" for it in items]
            out = []
            for it, (boxes, text) in zip(items, _grounded_boxes(ctx, items, images, prompts)):
                boxes = boxes or [[0.0, 0.0, 0.0, 0.0]]  # a parse failure: a zero-area box, a miss
                out.append({"predicted": boxes, "type": it["type"], "text": text,
                            **{f"R@{k}": recall_at_k(boxes, it["targets"], k) for k in (1, 5, 10)},
                            "merged_R@1": recall_at_k_merged(boxes, it["targets"], 1)})
            return out
        return _predict_with_images(ctx, batch, run, lambda it: {"type": it["type"]})

    def score(self, records):
        scored = [r for r in records if not r.get("missing_image")]
        metrics = {f"R@{k}": 100.0 * np.mean([r[f"R@{k}"] for r in scored]) if scored else 0.0 for k in (1, 5, 10)}
        metrics["merged_R@1"] = 100.0 * np.mean([r["merged_R@1"] for r in scored]) if scored else 0.0
        for t in sorted({r["type"] for r in scored} - {"all"}):
            metrics[f"R@1/{t}"] = 100.0 * np.mean([r["R@1"] for r in scored if r["type"] == t])
        return metrics


def _text_scores(records, field: str) -> dict:
    """pycocoevalcap scores (x100) of the generated `field` against each record's `references`."""
    from kosmos2_jax.evaluation.captions import caption_scores

    scored = [r for r in records if not r.get("missing_image")]
    if not scored:
        return {}
    scores = caption_scores({r["id"]: r[field] for r in scored}, {r["id"]: r["references"] for r in scored})
    return {k: 100.0 * v for k, v in scores.items()}


class CaptionTask:
    """Zero-shot captioning: prompt "An image of", beam 5; CIDEr, BLEU-4, METEOR via pycocoevalcap."""

    def __init__(self, name, karpathy_file):
        self.name, self.file = name, karpathy_file

    def load(self, data_dir, split):
        data = _load_json(os.path.join(data_dir, self.file), f"Karpathy split file for {self.name}")
        return [{"id": str(im.get("cocoid", im.get("imgid", im["filename"]))),
                 "image": os.path.join(im.get("filepath", ""), im["filename"]),
                 "references": [s["raw"] for s in im["sentences"]]}
                for im in data["images"] if im["split"] == split]

    def predict(self, ctx, batch):
        def run(items, images):
            _, new = ctx.generate_text(["An image of"] * len(items), images, max_new_tokens=30, num_beams=5)
            captions = [ctx.processor.post_process_generation(t)[0].strip().split("\n")[0] for t in new]
            return [{"caption": c, "references": it["references"]} for it, c in zip(items, captions)]
        return _predict_with_images(ctx, batch, run, lambda it: {})

    def score(self, records):
        return _text_scores(records, "caption")


class RegTask:
    """Referring-expression generation on RefCOCOg: the prompt `<phrase> It</phrase><object>{box}</object> is`
    (HF tokens of the paper's `<p> It </p><box>..</box> is`), greedy; the generated expression is
    scored against every expression of the same object with METEOR and CIDEr. Items are objects
    (image + box); MDETR's entries are grouped by them.

    k-shot (`shots=k`, the paper's k = 2, 4): k demonstrations `[image] <phrase> It</phrase><object>
    {box}</object> is {expression}.` precede the query, as one interleaved sequence. They are drawn
    from the `shots_split` objects (one of their expressions each), seeded by the query's id, so a
    rerun or a resumed run prompts identically; they are stored with the item."""

    def __init__(self, shots: int = 0, shots_split: str = "train"):
        if shots < 0:
            raise UsageError(f"shots must be >= 0, got {shots}")
        self.shots, self.shots_split = shots, shots_split
        self.name = "refcocog_reg" if shots == 0 else f"refcocog_reg_{shots}shot"

    def with_shots(self, shots: int, shots_split: str = "train") -> "RegTask":
        return RegTask(shots, shots_split)

    @staticmethod
    def _objects(data_dir, split):
        objects = {}
        for it in RefExpTask("refcocog").load(data_dir, split):
            key = (it["image"], tuple(round(v, 6) for v in it["target"]))
            objects.setdefault(key, {"id": it["id"], "image": it["image"], "target": it["target"], "references": []})
            objects[key]["references"].append(it["phrase"])
        return list(objects.values())

    def load(self, data_dir, split):
        items = self._objects(data_dir, split)
        if self.shots:
            pool = self._objects(data_dir, self.shots_split)
            if len(pool) < self.shots:
                raise UsageError(f"{self.shots}-shot REG needs {self.shots} demonstration objects; split "
                                 f"{self.shots_split!r} of {data_dir} has {len(pool)}")
            for it in items:
                rng = np.random.default_rng(zlib.crc32(f"{self.name}/{it['id']}".encode()))
                picks = rng.choice(len(pool), self.shots, replace=False)
                it["shots"] = [{"image": pool[i]["image"], "target": pool[i]["target"],
                                "expression": pool[i]["references"][rng.integers(len(pool[i]["references"]))]}
                               for i in picks]
        return items

    def _demonstrations(self, ctx, item):
        parts = []
        for shot in item["shots"]:
            image = ctx.image(shot)
            if image is None:
                raise FileNotFoundError(f"demonstration image not found or unreadable: "
                                        f"{os.path.join(ctx.image_dir, shot['image'])}")
            parts += [image, (f"<phrase> It</phrase> is {shot['expression']}.", [tuple(shot["target"])])]
        return parts

    def predict(self, ctx, batch):
        def run(items, images):
            query = [("<phrase> It</phrase> is", [tuple(it["target"])]) for it in items]
            if self.shots:
                prompts = [self._demonstrations(ctx, it) + [im, q] for it, im, q in zip(items, images, query)]
                _, new = ctx.generate_interleaved(prompts, max_new_tokens=20)
            else:
                _, new = ctx.generate_text([q for q, _ in query], images, max_new_tokens=20,
                                           bboxes=[b for _, b in query])
            texts = [ctx.processor.post_process_generation(t)[0].strip().split("\n")[0] for t in new]
            return [{"expression": t.split(".")[0].strip(), "references": it["references"],
                     **({"shots": it["shots"]} if self.shots else {})} for it, t in zip(items, texts)]
        return _predict_with_images(ctx, batch, run, lambda it: {})

    def score(self, records):
        return {k: v for k, v in _text_scores(records, "expression").items() if k in ("METEOR", "CIDEr")}


class VQATask:
    """VQAv2: prompt "Question: {q} Answer:", greedy; VQA accuracy with the official normalization;
    the evaluation server's JSON ([{question_id, answer}]) is written next to the results."""

    name = "vqav2"

    def load(self, data_dir, split):
        questions = _load_json(os.path.join(data_dir, f"v2_OpenEnded_mscoco_{split}_questions.json"), "VQAv2 questions")
        ann_path = os.path.join(data_dir, f"v2_mscoco_{split}_annotations.json")
        answers = {}
        if os.path.isfile(ann_path):
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in _load_json(ann_path, "")["annotations"]}
        image_split = split.replace("test-dev", "test")
        return [{"id": str(q["question_id"]), "question": q["question"], "answers": answers.get(q["question_id"]),
                 "image": f"COCO_{image_split}_{q['image_id']:012d}.jpg"} for q in questions["questions"]]

    def predict(self, ctx, batch):
        def run(items, images):
            _, new = ctx.generate_text([f"Question: {it['question']} Answer:" for it in items], images, max_new_tokens=10)
            answers = [ctx.processor.post_process_generation(t)[0].strip().split("\n")[0] for t in new]
            return [{"answer": a, "question_id": int(it["id"]), "answers": it["answers"]} for it, a in zip(items, answers)]
        return _predict_with_images(ctx, batch, run, lambda it: {"answer": "", "question_id": int(it["id"])})

    def score(self, records):
        from kosmos2_jax.evaluation.vqa import vqa_accuracy

        scored = [r for r in records if r.get("answers") and not r.get("missing_image")]
        return {"accuracy": 100.0 * np.mean([vqa_accuracy(r["answer"], r["answers"]) for r in scored])} if scored else {}

    def server_json(self, records):
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]


class LanguageTask:
    """Zero-shot multiple choice by log-likelihood of each candidate given the context (text only)."""

    name = "language"

    def load(self, data_dir, split):
        path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, f"{split}.jsonl")
        with open(_need(path, "language-task JSONL")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for n, r in enumerate(rows):
            missing = {"id", "task", "candidates", "label"} - set(r)
            if "context" not in r and "contexts" not in r:
                missing.add("context")
            if missing:
                raise UsageError(f"{path}: line {n + 1} lacks {sorted(missing)}")
        return [dict(r, id=str(r["id"])) for r in rows]

    def predict(self, ctx, batch):
        from kosmos2_jax.evaluation.loglik import choose, pair_logprobs

        out = []
        for it in batch:
            contexts = it.get("contexts") or [it["context"]] * len(it["candidates"])
            scores = pair_logprobs(ctx.model, ctx.params, ctx.processor.tokenizer, list(zip(contexts, it["candidates"])))
            pick = choose(scores)
            out.append({"task": it["task"], "choice": pick, "correct": pick == int(it["label"]),
                        "logprobs": [s["sum"] for s in scores]})
        return out

    def score(self, records):
        by = collections.defaultdict(list)
        for r in records:
            by[r["task"]].append(r["correct"])
        return {t: 100.0 * float(np.mean(v)) for t, v in sorted(by.items())}


TASKS = {
    "shapes": ShapesTask(),
    "refexp": RefExpJsonlTask(),
    "refcoco": RefExpTask("refcoco"), "refcoco+": RefExpTask("refcoco+"), "refcocog": RefExpTask("refcocog"),
    "flickr30k_entities": FlickrEntitiesTask(),
    "flickr30k_caption": CaptionTask("flickr30k_caption", "dataset_flickr30k.json"),
    "coco_caption": CaptionTask("coco_caption", "dataset_coco.json"),
    "refcocog_reg": RegTask(),
    "vqav2": VQATask(),
    "language": LanguageTask(),
}
