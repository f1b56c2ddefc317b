"""Box annotations in the formats users have -> GRIT-style records (`config.data.sources` kinds
`coco`, `odvg`, `refexp`; the annotation file is the source's `path`, its images are under its
`data_dir`). A record is what the tfds GRIT builders write (data/schema.py): image bytes, caption,
width, height, and rows [start, end, x0, y0, x1, y1, score] of caption spans with their boxes,
normalized by the image's size; the pipeline turns it into an example as a GRIT record.

- `coco`: a COCO detection file (`instances_*.json`). One record per image: the caption names its
  categories in order of first annotation, comma-separated ("person, dog, frisbee": a detection
  prompt naming the categories); each name's span holds all its boxes. Boxes are [x, y, w, h]
  pixels.
- `odvg`: Grounding DINO's ODVG JSONL. `detection` records ({"instances": [{"bbox", "label",
  "category"}]}) as COCO's; `grounding` records ({"caption", "regions": [{"bbox", "phrase",
  "tokens_positive"?}]}): each phrase's span is its first `tokens_positive` [start, end) or else
  its first occurrence in the caption. Boxes are [x0, y0, x1, y1] pixels; `height`/`width` given.
- `refexp`: JSONL, one referring expression a line: {"image", "expression", "box" or "boxes"}
  with [x0, y0, x1, y1] pixel boxes; the span is the whole expression (image size read from the
  image when the line has no `width`/`height`).

Dropped boxes: crowd annotations (`iscrowd` 1: a region of many objects, not one to ground),
boxes with no area after clipping to the image; a record left with none is skipped ("no boxes").
Skipped records, counted by reason like other bad records: "missing image", "unknown category"
(a category id not in the file's categories, or an ODVG instance without a name), "no boxes",
"phrase not in caption", "bad annotation" (a line that is not a record of its format).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from kosmos2_jax.format.images import ImageError, open_image
from kosmos2_jax.utils.errors import UsageError

ANNOTATION_KINDS = ("coco", "odvg", "refexp")


def _box(x0, y0, x1, y1, width: int, height: int):
    """Pixel corners -> normalized [x0, y0, x1, y1] clipped to the image, None when no area is left."""
    x0, x1 = sorted((min(max(float(x0), 0.0), width), min(max(float(x1), 0.0), width)))
    y0, y1 = sorted((min(max(float(y0), 0.0), height), min(max(float(y1), 0.0), height)))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0 / width, y0 / height, x1 / width, y1 / height]


def _rows(spans) -> np.ndarray:
    """[(start, end, [boxes])] -> [N, 7] rows, score 1 (given boxes are not detector guesses)."""
    rows = [[start, end, *box, 1.0] for start, end, boxes in spans for box in boxes]
    return np.asarray(rows, np.float32).reshape(-1, 7)


def _categories_caption(named_boxes) -> tuple[str, list]:
    """[(name, box)] -> ("a, b, c", spans): names in order of first appearance, all boxes of a name
    on its span."""
    by_name = collections.OrderedDict()
    for name, box in named_boxes:
        by_name.setdefault(name, []).append(box)
    caption, spans = "", []
    for name, boxes in by_name.items():
        if caption:
            caption += ", "
        spans.append((len(caption), len(caption) + len(name), boxes))
        caption += name
    return caption, spans


def _record(key: str, caption: str, spans, width: int, height: int, image: str) -> dict:
    if not any(boxes for _, _, boxes in spans):
        return {"bad": "no boxes"}
    rows = _rows(spans)
    return {"key": key, "image_file": image, "caption": caption, "width": int(width), "height": int(height),
            "noun_chunks": rows, "ref_exps": rows}


# --- the formats ------------------------------------------------------------------------------
def coco_items(path: str) -> list[dict]:
    """A COCO detection JSON -> one record (or {"bad": reason}) per image that has annotations."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise UsageError(f"{path}: not a COCO detection file (needs images, annotations and categories)")
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_image = collections.OrderedDict((im["id"], []) for im in data["images"])
    for ann in data["annotations"]:
        per_image.setdefault(ann.get("image_id"), []).append(ann)
    images = {im["id"]: im for im in data["images"]}
    out = []
    for image_id, anns in per_image.items():
        im = images.get(image_id)
        if im is None or not anns:
            if im is None:
                out.append({"bad": "bad annotation"})
            continue
        if any(a.get("category_id") not in names for a in anns):
            out.append({"bad": "unknown category"})
            continue
        w, h = im["width"], im["height"]
        named = []
        for a in anns:
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            box = _box(x, y, x + bw, y + bh, w, h)
            if box is not None:
                named.append((names[a["category_id"]], box))
        caption, spans = _categories_caption(named)
        out.append(_record(f"coco/{image_id}", caption, spans, w, h, im["file_name"]))
    return out


def _odvg_record(line: dict, n: int) -> dict:
    w, h, image = line["width"], line["height"], line["filename"]
    if "grounding" in line:
        g = line["grounding"]
        caption, spans = g["caption"], []
        for region in g.get("regions", []):
            phrase = region.get("phrase", "")
            positive = region.get("tokens_positive")
            if positive:
                start, end = positive[0]
            else:
                start = caption.find(phrase) if phrase else -1
                if start < 0:
                    return {"bad": "phrase not in caption"}
                end = start + len(phrase)
            box = _box(*region["bbox"], w, h)
            spans.append((int(start), int(end), [box] if box is not None else []))
        spans = [s for s in spans if s[2]]
        return _record(f"odvg/{n}", caption, spans, w, h, image)
    instances = line["detection"]["instances"]
    if any(not inst.get("category") for inst in instances):
        return {"bad": "unknown category"}
    named = [(inst["category"], box) for inst in instances
             for box in [_box(*inst["bbox"], w, h)] if box is not None]
    caption, spans = _categories_caption(named)
    return _record(f"odvg/{n}", caption, spans, w, h, image)


def _refexp_record(line: dict, n: int, image_dir: str) -> dict:
    expression, image = line["expression"].strip(), line["image"]
    boxes = line.get("boxes") or [line["box"]]
    w, h = line.get("width"), line.get("height")
    if not (w and h):
        path = os.path.join(image_dir, image)
        if not os.path.isfile(path):
            return {"bad": "missing image"}
        try:
            with open(path, "rb") as f:
                w, h = open_image(f.read(), decode=False).size
        except ImageError:
            return {"bad": "undecodable image"}
    kept = [b for b in (_box(*box, w, h) for box in boxes) if b is not None]
    return _record(f"refexp/{n}", expression, [(0, len(expression), kept)], w, h, image)


def jsonl_items(path: str, kind: str, image_dir: str) -> list[dict]:
    """An ODVG or referring-expression JSONL file -> a record (or {"bad": reason}) per line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                out.append(_odvg_record(line, n) if kind == "odvg" else _refexp_record(line, n, image_dir))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                out.append({"bad": "bad annotation"})
    return out


def load_items(path: str, kind: str, image_dir: str) -> list[dict]:
    """The records of an annotation file, without their images (`with_image` reads one)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} annotation file not found: {path!r}")
    if kind == "coco":
        return coco_items(path)
    if kind in ("odvg", "refexp"):
        return jsonl_items(path, kind, image_dir)
    raise UsageError(f"annotation kind {kind!r} not in {ANNOTATION_KINDS}")


def with_image(item: dict, image_dir: str) -> dict:
    """A record with its image's bytes (a missing image file: {"bad": "missing image"})."""
    if "bad" in item:
        return item
    path = os.path.join(image_dir, item["image_file"])
    if not os.path.isfile(path):
        return {"bad": "missing image"}
    with open(path, "rb") as f:
        return dict(item, image=f.read())
