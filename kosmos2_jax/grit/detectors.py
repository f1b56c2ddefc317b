"""Grounding detectors behind one interface:

    detector.detect(images, phrases, keys) -> per image, per phrase, a list of (box, score)

`images` are PIL images, `phrases[i]` the phrase strings of image i, `keys[i]` its record key; boxes
are normalized (x1, y1, x2, y2) in the original image. Backends:
- `precomputed`: boxes read from a JSONL file, one line per image:
  `{"key": K, "detections": {"phrase": [[x1, y1, x2, y2, score], ...], ...}}` (normalized), keyed by
  the phrases `python -m kosmos2_jax.grit.build --list_phrases` writes;
- `hf`: a transformers zero-shot detector (OWL-ViT, OWLv2, Grounding DINO) from a local folder;
- `kosmos2`: this project's model grounding each phrase by generation.
"""

from __future__ import annotations

import json
import math
import os
from typing import Protocol, Sequence

import numpy as np

from kosmos2_jax.utils.errors import UsageError

Detections = list  # [image][phrase] -> [(box, score)]


class Detector(Protocol):
    def detect(self, images: Sequence, phrases: Sequence[Sequence[str]], keys: Sequence[str]) -> Detections: ...


def _is_scored_box(row) -> bool:
    return isinstance(row, list) and len(row) == 5 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)


class PrecomputedDetector:
    """Detections from a JSONL file keyed by record key and phrase: the phrases are the ones
    `grit.build --list_phrases` writes for the same input; every detection is checked when read."""

    def __init__(self, path: str):
        self.table: dict[str, dict[str, list]] = {}
        if not os.path.isfile(path):
            raise FileNotFoundError(f"precomputed detections {path!r} not found")
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.table[str(row["key"])] = detections = row["detections"]
                    if not isinstance(detections, dict):
                        raise ValueError("detections is not an object of phrase -> boxes")
                except (ValueError, KeyError, TypeError) as e:
                    raise UsageError(f"{path}:{n}: expected {{\"key\": ..., \"detections\": {{phrase: [[x1, y1, x2, y2, "
                                     f"score], ...]}}}}: {e}") from None
                for phrase, rows in detections.items():
                    bad = next((r for r in rows if not _is_scored_box(r)), None) if isinstance(rows, list) else rows
                    if bad is not None:
                        raise UsageError(
                            f"{path}:{n}: {phrase!r}: {json.dumps(bad)} is not [x1, y1, x2, y2, score] (5 numbers; "
                            "a box without a score needs one: the 0.65 score threshold keeps boxes above it)")

    def detect(self, images, phrases, keys) -> Detections:
        out = []
        for key, names in zip(keys, phrases):
            found = self.table.get(str(key), {})
            out.append([[(tuple(r[:4]), r[4]) for r in found.get(name, [])] for name in names])
        return out


class HFDetector:
    """A transformers zero-shot detector loaded from a local folder (`save_pretrained` layout).

    OWL-ViT / OWLv2 take each phrase as its own query (truncated to the text encoder's 16 tokens).
    Grounding DINO takes one prompt "p1. p2. ..."; phrases are packed into as many prompts as needed
    to stay under its text limit, and a query's score for a phrase is the max of its token scores
    over that phrase's tokens (exact character spans, no substring matching of decoded labels).
    Boxes with a score below `min_score` are not returned (the 0.65 rule is applied later)."""

    def __init__(self, path: str, device: str = "cpu", min_score: float = 0.1, batch_size: int = 8):
        import torch
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        self.torch, self.device, self.min_score, self.batch_size = torch, device, min_score, batch_size
        self.kind = AutoConfig.from_pretrained(path).model_type
        if self.kind not in ("owlvit", "owlv2", "grounding-dino"):
            raise UsageError(f"{path}: model type {self.kind!r} is not a supported zero-shot detector "
                             "(owlvit, owlv2, grounding-dino)")
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()

    def detect(self, images, phrases, keys) -> Detections:
        out = []
        for start in range(0, len(images), self.batch_size):
            ims, names = images[start:start + self.batch_size], phrases[start:start + self.batch_size]
            if self.kind == "grounding-dino":
                out.extend(self._dino(im, ns) for im, ns in zip(ims, names))
            else:
                out.extend(self._owl(ims, names))
        return out

    def _owl(self, images, phrases) -> Detections:
        torch = self.torch
        queries = [list(p) if p else [" "] for p in phrases]
        limit = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=queries, images=[im.convert("RGB") for im in images], return_tensors="pt",
                                padding="max_length", truncation=True, max_length=limit).to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        # OWLv2 pads images to a square at the bottom/right: boxes are relative to the padded side.
        sides = [(max(im.size), max(im.size)) if self.kind == "owlv2" else (im.height, im.width) for im in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.min_score,
                                                                target_sizes=torch.tensor(sides))
        out = []
        for im, names, res in zip(images, phrases, results):
            per = [[] for _ in names]
            for box, score, label in zip(res["boxes"].tolist(), res["scores"].tolist(), res["labels"].tolist()):
                if label < len(names):
                    x1, y1, x2, y2 = box
                    per[label].append(((x1 / im.width, y1 / im.height, x2 / im.width, y2 / im.height), score))
            out.append(per)
        return out

    def _dino(self, image, phrases) -> list:
        torch = self.torch
        tokenizer = self.processor.tokenizer
        limit = getattr(self.model.config, "max_text_len", 256) - 2
        per = [[] for _ in phrases]
        lengths = [len(tokenizer(name + ".", add_special_tokens=False)["input_ids"]) for name in phrases]
        for group in pack_phrases(lengths, limit):
            prompt, spans = "", []
            for i in group:
                spans.append((i, len(prompt), len(prompt) + len(phrases[i])))
                prompt += phrases[i] + ". "
            inputs = self.processor(images=image.convert("RGB"), text=prompt.strip(), return_tensors="pt",
                                    return_offsets_mapping=False, truncation=True).to(self.device)
            enc = tokenizer(prompt.strip(), return_offsets_mapping=True, truncation=True,
                            max_length=inputs["input_ids"].shape[1])
            with torch.no_grad():
                outputs = self.model(**inputs)
            probs = outputs.logits[0].sigmoid().cpu().numpy()  # [queries, text positions]
            boxes = outputs.pred_boxes[0].cpu().numpy()  # cx, cy, w, h normalized
            offsets = enc["offset_mapping"]
            for i, s, e in spans:
                tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e and t < probs.shape[1]]
                if not tokens:
                    continue
                scores = probs[:, tokens].max(axis=1)
                for q in np.nonzero(scores >= self.min_score)[0]:
                    cx, cy, w, h = map(float, boxes[q])
                    per[i].append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), float(scores[q])))
        return per


def pack_phrases(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Greedy packing of phrases (token counts) into prompts of at most `limit` tokens, in order; a
    phrase longer than the limit gets a prompt of its own (and is truncated there)."""
    groups, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > limit:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


class Kosmos2Detector:
    """Grounds each phrase with a KOSMOS-2 checkpoint: prompt `<grounding><phrase>{p}</phrase><object>`,
    the most probable location token, then the most probable one after it (both restricted to
    location tokens) give the box; its score is the geometric mean of the two tokens' probabilities
    under the full softmax (low when the model would rather not write a box).

    Device batches have fixed shapes, whatever the records: a call's images go through the vision
    tower once each, `batch_size` at a time (the last batch padded), and all its (image, phrase)
    prompts, across records, are batched `batch_size` at a time with their image's embeddings,
    left-padded to a multiple of `length_bucket` tokens. So an accelerator compiles one image
    program and one text program per length bucket, not one per record shape (`compiled_shapes`)."""

    def __init__(self, checkpoint: str, tokenizer: str, batch_size: int = 16, length_bucket: int = 16):
        import jax

        from kosmos2_jax.weights.hf import DECODING, load_model
        from kosmos2_jax.models import Kosmos2
        from kosmos2_jax.format.processor import processor_for

        self.model, self.params = load_model(checkpoint, **DECODING)
        self.processor = processor_for(tokenizer, self.model)
        self.batch_size, self.length_bucket = batch_size, length_bucket
        tok = self.processor.tokenizer
        self.first_loc, self.num_loc = tok.first_location_id, tok.num_location_tokens
        self.compiled_shapes: set = set()  # (program, shape) pairs run so far
        self._features = jax.jit(lambda p, pixels: self.model.apply({"params": p}, pixels,
                                                                    method=Kosmos2.image_features))
        self._logits = jax.jit(lambda p, x: self.model.apply(
            {"params": p}, None, x["input_ids"], x["attention_mask"], x["image_embeds_position_mask"],
            image_embeds=x["image_embeds"])[:, -1].astype("float32"))

    def _image_embeds(self, images) -> np.ndarray:
        from kosmos2_jax.format.processor import preprocess_image

        pixels = np.stack([preprocess_image(im, self.processor.image_size) for im in images])
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start:start + self.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], self.batch_size - len(chunk), 0)])
            self.compiled_shapes.add(("image", padded.shape))
            out.append(np.asarray(self._features(self.params, padded))[:len(chunk)])
        return np.concatenate(out)

    def _next_location(self, rows, embeds):
        """Left-padded rows [(ids, image mask)] with their image embeddings -> (location index, log p)."""
        n, tok = len(rows), self.processor.tokenizer
        length = -(-max(len(ids) for ids, _ in rows) // self.length_bucket) * self.length_bucket
        x = {"input_ids": np.full((self.batch_size, length), tok.pad_id, np.int32),
             "attention_mask": np.zeros((self.batch_size, length), np.int32),
             "image_embeds_position_mask": np.zeros((self.batch_size, length), np.int32),
             "image_embeds": np.concatenate([embeds, np.repeat(embeds[:1], self.batch_size - n, 0)])}
        for r, (ids, mask) in enumerate(rows + [rows[0]] * (self.batch_size - n)):  # padding rows repeat row 0
            x["input_ids"][r, length - len(ids):] = ids
            x["attention_mask"][r, length - len(ids):] = 1
            x["image_embeds_position_mask"][r, length - len(ids):] = mask
        self.compiled_shapes.add(("text", x["input_ids"].shape))
        logits = np.asarray(self._logits(self.params, x), np.float64)[:n]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        loc = logp[:, self.first_loc:self.first_loc + self.num_loc]
        idx = loc.argmax(-1)
        return idx, loc[np.arange(len(idx)), idx]

    def detect(self, images, phrases, keys) -> Detections:
        from kosmos2_jax.format import grounding

        if not images:
            return []
        embeds = self._image_embeds(images)
        pairs = [(i, name) for i, names in enumerate(phrases) for name in names]
        found = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            rows = [self.processor.encode_prompt(f"<grounding><phrase>{name}</phrase><object>", with_image=True)
                    for _, name in batch]
            picked = embeds[[i for i, _ in batch]]
            ul, lp_ul = self._next_location(rows, picked)
            longer = [(ids + [int(a) + self.first_loc], mask + [0]) for (ids, mask), a in zip(rows, ul)]
            lr, lp_lr = self._next_location(longer, picked)
            for a, b, la, lb in zip(ul, lr, lp_ul, lp_lr):
                box = grounding.patch_pair_to_box(int(a), int(b), self.processor.num_bins)
                found.append([(tuple(box), float(math.exp((la + lb) / 2)))])
        out, k = [], 0
        for names in phrases:
            out.append(found[k:k + len(names)])
            k += len(names)
        return out


def make_detector(kind: str, path: str = "", tokenizer: str = "", device: str = "cpu", min_score: float = 0.1,
                  batch_size: int = 8) -> Detector:
    if kind == "precomputed":
        return PrecomputedDetector(path)
    if kind == "hf":
        return HFDetector(path, device=device, min_score=min_score, batch_size=batch_size)
    if kind == "kosmos2":
        if not tokenizer:
            raise UsageError("the kosmos2 detector needs --tokenizer (the sentencepiece model)")
        return Kosmos2Detector(path, tokenizer, batch_size=batch_size)
    raise UsageError(f"unknown detector {kind!r} (precomputed, hf, kosmos2)")
