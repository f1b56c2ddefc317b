"""Referring-expression grounding (RefCOCO protocol, reference §5.2): prompt
`<grounding><phrase>{expression}</phrase>`, greedy decoding, the first box of the entity whose
name equals the expression, hit when IoU >= 0.5; nothing parsed is a miss."""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image

from kosmos2_jax.evaluation.metrics import first_box_hit, iou
from kosmos2_jax.generate import generate


def prompt(expression: str) -> str:
    return f"<grounding><phrase>{expression}</phrase>"


def _image(item):
    data = item["image"]
    return Image.open(io.BytesIO(data)).convert("RGB") if isinstance(data, (bytes, np.bytes_)) else data


def evaluate_refexp(model, params, processor, items: Iterable[dict], batch_size: int = 16, max_new_tokens: int = 8,
                    no_repeat_ngram_size: int = 3, progress=None) -> dict:
    """`items`: dicts with `image` (bytes or PIL), `expression`, `box` (normalized). Returns accuracy,
    count and one prediction record per item."""
    items = list(items)
    records = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        expressions = [str(it["expression"].decode() if isinstance(it["expression"], bytes) else it["expression"])
                       for it in chunk]
        images = [_image(it) for it in chunk]
        inputs = processor([prompt(e) for e in expressions], images=images, padding_side="left")
        out = generate(model, params, inputs, max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                       eos_token_id=processor.tokenizer.eos_id, pad_token_id=processor.tokenizer.pad_id)
        for expression, item, ids in zip(expressions, chunk, out.sequences):
            text = processor.decode(ids)
            _, entities = processor.post_process_generation(text)
            boxes = [b for name, _, bs in entities if name == expression.strip() for b in bs]
            target = [float(v) for v in item["box"]]
            records.append({"expression": expression, "target": target, "predicted": boxes[:1],
                            "iou": iou(boxes[0], target) if boxes else 0.0, "hit": first_box_hit(boxes, target),
                            "text": processor.post_process_generation(text, cleanup_and_extract=False)})
        if progress:
            progress(len(records), len(items))
    hits = sum(r["hit"] for r in records)
    return {"accuracy": hits / max(len(records), 1), "count": len(records), "predictions": records}
