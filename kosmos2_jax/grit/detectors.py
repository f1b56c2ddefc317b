"""Grounding detectors behind one interface:

    detector.detect(images, phrases, keys) -> per image, per phrase, a list of (box, score)

`images` are PIL images, `phrases[i]` the phrase strings of image i, `keys[i]` its record key; boxes
are normalized (x1, y1, x2, y2) in the original image. Backends:
- `precomputed`: boxes read from a JSONL file, one line per image:
  `{"key": K, "detections": {"phrase": [[x1, y1, x2, y2, score], ...], ...}}` (normalized);
- `hf`: a transformers zero-shot detector (OWL-ViT, OWLv2, Grounding DINO) from a local folder;
- `kosmos2`: this project's model grounding each phrase by generation.
"""

from __future__ import annotations

import json
import math
import os
from typing import Protocol, Sequence

import numpy as np

Detections = list  # [image][phrase] -> [(box, score)]


class Detector(Protocol):
    def detect(self, images: Sequence, phrases: Sequence[Sequence[str]], keys: Sequence[str]) -> Detections: ...


class PrecomputedDetector:
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
                    self.table[str(row["key"])] = row["detections"]
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"key\": ..., \"detections\": {{phrase: [[x1, y1, x2, y2, "
                                     f"score], ...]}}}}: {e}") from None

    def detect(self, images, phrases, keys) -> Detections:
        out = []
        for key, names in zip(keys, phrases):
            found = self.table.get(str(key), {})
            out.append([[(tuple(r[:4]), r[4]) for r in found.get(name, []) if len(r) == 5] for name in names])
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
            raise ValueError(f"{path}: model type {self.kind!r} is not a supported zero-shot detector "
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
    under the full softmax (low when the model would rather not write a box)."""

    def __init__(self, checkpoint: str, tokenizer: str, batch_size: int = 16):
        import jax

        from kosmos2_jax.convert import DECODING, load_model
        from kosmos2_jax.tokenizer import tokenizer_for
        from kosmos2_jax.processor import Kosmos2Processor

        self.model, self.params = load_model(checkpoint, **DECODING)
        tok = tokenizer_for(tokenizer, self.model)
        self.processor = Kosmos2Processor(tok, image_size=self.model.config.vision.image_size,
                                          num_image_tokens=self.model.config.latent_query_num)
        self.batch_size = batch_size
        self.first_loc, self.num_loc = tok.first_location_id, tok.num_location_tokens
        self._logits = jax.jit(lambda p, x: self.model.apply(
            {"params": p}, x["pixel_values"], x["input_ids"], x["attention_mask"], x["image_embeds_position_mask"]
        )[:, -1].astype("float32"))

    def _next_location(self, inputs):
        logits = np.asarray(self._logits(self.params, inputs), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        loc = logp[:, self.first_loc:self.first_loc + self.num_loc]
        idx = loc.argmax(-1)
        return idx, loc[np.arange(len(idx)), idx]

    def detect(self, images, phrases, keys) -> Detections:
        from kosmos2_jax import grounding

        out = []
        for image, names in zip(images, phrases):
            per = []
            for start in range(0, len(names), self.batch_size):
                batch = list(names[start:start + self.batch_size])
                prompts = [f"<grounding><phrase>{n}</phrase><object>" for n in batch]
                inputs = self.processor(prompts, images=[image] * len(batch), padding_side="left")
                ul, lp_ul = self._next_location(inputs)
                column = lambda v: np.full((len(batch), 1), v, np.int32)
                extended = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], (ul + self.first_loc)[:, None]], 1)
                                .astype(np.int32),
                                attention_mask=np.concatenate([inputs["attention_mask"], column(1)], 1),
                                image_embeds_position_mask=np.concatenate([inputs["image_embeds_position_mask"],
                                                                           column(0)], 1))
                lr, lp_lr = self._next_location(extended)
                for a, b, la, lb in zip(ul, lr, lp_ul, lp_lr):
                    box = grounding.patch_pair_to_box(int(a), int(b), self.processor.num_bins)
                    per.append([(tuple(box), float(math.exp((la + lb) / 2)))])
            out.append(per)
        return out


def make_detector(kind: str, path: str = "", tokenizer: str = "", device: str = "cpu", min_score: float = 0.1,
                  batch_size: int = 8) -> Detector:
    if kind == "precomputed":
        return PrecomputedDetector(path)
    if kind == "hf":
        return HFDetector(path, device=device, min_score=min_score, batch_size=batch_size)
    if kind == "kosmos2":
        if not tokenizer:
            raise ValueError("the kosmos2 detector needs --tokenizer (the sentencepiece model)")
        return Kosmos2Detector(path, tokenizer, batch_size=batch_size)
    raise ValueError(f"unknown detector {kind!r} (precomputed, hf, kosmos2)")
