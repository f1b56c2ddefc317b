"""Run the vision tower on real images only, not on every image slot of a batch.

A packed row has `pack_max_images` image slots and holds as many images as its examples bring
(`has_image`, its first slots); an unpacked batch has one slot per row, text-only rows included.
The vision tower costs the same for an empty slot as for a real image. At full size, with 12 of
24 slots filled, that is 1.2x the step time on an H100 (README, "Benchmarks").

`compact_images` gathers the batch's real images into `groups` equal blocks of `capacity` images
(zeros after each block's last image): pixel_values [groups * capacity, H, W, 3]. It also returns
`image_index` [groups, rows / groups, slots], each slot's image within its block; an empty slot
points at its block's first entry, which no image position reads. Rows are split into the groups in order.
The model runs the tower on the compact images and gathers each row's embeddings back
(`models.kosmos2.gather_image_embeds`).

Groups keep that gather on the device that holds the rows. The trainer uses one group per
micro-batch of each batch shard (`grad_accum_steps` per shard), so that each micro-batch takes
whole groups (`trainer.micro_batches`). Capacity is
rounded up to a quarter of a group's slots (`capacity`), so a run compiles at most four steps.
"""

from __future__ import annotations

import numpy as np


def capacity(needed: int, slots: int, buckets: int = 4) -> int:
    """The smallest multiple of ceil(slots / buckets) that holds `needed` images (at least one
    multiple, at most `slots`)."""
    step = -(-slots // buckets)
    return min(slots, max(step, -(-needed // step) * step))


def image_counts(pixels: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """Real images per row: packed rows ([B, slots, ...]) hold `has_image` of them in their first
    slots; unpacked rows ([B, H, W, 3]) hold one where `has_image` is set."""
    counts = np.asarray(has_image).astype(np.int64).reshape(-1)
    slots = pixels.shape[1] if pixels.ndim == 5 else 1
    if counts.shape[0] != pixels.shape[0] or counts.min(initial=0) < 0 or counts.max(initial=0) > slots:
        raise ValueError(f"has_image {counts.tolist()} does not fit {pixels.shape[0]} rows of {slots} image slots")
    return counts


def compact_images(pixels: np.ndarray, counts: np.ndarray, groups: int, cap: int):
    """-> (pixel_values [groups * cap, H, W, 3], image_index [groups, rows / groups, slots] int32).
    Every group must hold at most `cap` images."""
    rows = pixels.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} groups")
    per_row = pixels if pixels.ndim == 5 else pixels[:, None]
    slots = per_row.shape[1]
    compact = np.zeros((groups * cap, *per_row.shape[2:]), pixels.dtype)
    index = np.zeros((rows, slots), np.int32)
    group_rows = rows // groups
    for g in range(groups):
        used = 0
        for r in range(g * group_rows, (g + 1) * group_rows):
            n = int(counts[r])
            if used + n > cap:
                raise ValueError(f"group {g} holds more than capacity {cap} images")
            compact[g * cap + used:g * cap + used + n] = per_row[r, :n]
            index[r, :n] = np.arange(used, used + n)
            used += n
    return compact, index.reshape(groups, group_rows, slots)
