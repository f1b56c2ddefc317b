"""Sequence packing: several examples in one row, kept apart by `segment_ids`.

Examples (`examples.py`, right-padded to `seq_len`) are laid end to end in arrival order until the
next one would overflow the row's tokens or its `max_images` image slots; that one opens the next
row. A packed row has `segment_ids` (1, 2, ... per example, 0 on padding), the examples' ids and
masks concatenated, and `pixel_values` [max_images, S, S, 3] holding the row's images in order
(zeros after the last; an interleaved example brings several), which is what the model's
several-images-per-row input takes: the k-th group of image slots gets the k-th image. The decoder masks attention across segments and counts
positions per segment, so each example is computed exactly as it would be alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask", "image_embeds_position_mask")


def example_length(example: dict) -> int:
    return int(np.sum(example["attention_mask"]))


def fits(tokens: int, images: int, candidate: dict, seq_len: int, max_images: int) -> bool:
    """Whether `candidate` fits in a row already holding `tokens` tokens and `images` images."""
    return (tokens + example_length(candidate) <= seq_len
            and images + int(candidate["has_image"]) <= max_images)


def pack_row(examples: Sequence[dict], seq_len: int, max_images: int, pad_id: int) -> dict:
    """Examples that `fit` together -> one packed row (numpy, the fields of an example plus
    `segment_ids`; `has_image` becomes the row's image count)."""
    if not examples:
        raise ValueError("a packed row needs at least one example")
    keys = TOKEN_KEYS + tuple(k for k in ("source_ids",) if k in examples[0])
    row = {k: np.zeros(seq_len, np.int32) for k in keys}
    row["input_ids"][:] = pad_id
    row["segment_ids"] = np.zeros(seq_len, np.int32)
    image_shape = examples[0]["pixel_values"].shape[-3:]  # [S, S, 3], or [k, S, S, 3] for k images (interleaved)
    row["pixel_values"] = np.zeros((max_images, *image_shape), examples[0]["pixel_values"].dtype)
    pos = images = 0
    for segment, ex in enumerate(examples, start=1):
        n = example_length(ex)
        if pos + n > seq_len:
            raise ValueError(f"examples of {pos + n} tokens do not fit a row of {seq_len}")
        for k in keys:
            row[k][pos:pos + n] = ex[k][:n]
        row["segment_ids"][pos:pos + n] = segment
        pos += n
        count = int(ex["has_image"])
        if images + count > max_images:
            raise ValueError(f"more than max_images={max_images} images in one packed row")
        pixels = ex["pixel_values"] if ex["pixel_values"].ndim == 4 else ex["pixel_values"][None]
        row["pixel_values"][images:images + count] = pixels[:count]
        images += count
    row["has_image"] = np.int32(images)
    return row
