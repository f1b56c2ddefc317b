"""Shared body of the RefCOCO/+/g and Flickr30k Entities tfds builders: evaluation items (read by
`kosmos2_jax.evaluation.tasks` from the MDETR annotation files) -> GRIT-style records, so the same
datasets serve fine-tuning (the training pipeline reads GRIT records) and inspection."""

from __future__ import annotations

import collections
import os

import numpy as np

from kosmos2_jax.format.images import ImageError, open_image


def grit_records(items, image_dir: str, skipped: collections.Counter):
    """Group items by image+caption; yield (key, GRIT record). An item holds `image`, `caption`,
    `span` [start, end) and `targets` (normalized boxes). Items whose image is missing are counted."""
    groups = collections.OrderedDict()
    for it in items:
        groups.setdefault((it["image"], it["caption"], it.get("record", it["id"])), []).append(it)
    for (image, caption, record), members in groups.items():
        path = os.path.join(image_dir, image)
        if not os.path.isfile(path):
            skipped["missing image"] += 1
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            width, height = open_image(data, decode=False).size
        except ImageError:
            skipped["undecodable image"] += 1
            continue
        rows = [[*m["span"], *box, 1.0] for m in members for box in m["targets"]]
        rows = np.asarray(rows, np.float32).reshape(-1, 7)
        yield str(record), {"key": str(record), "image": data, "caption": caption, "width": width, "height": height,
                            "noun_chunks": rows, "ref_exps": rows}
