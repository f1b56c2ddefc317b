"""Box rows checked for the input pipeline, and the pretraining crop: resize the shorter side,
center-crop, remap boxes, and drop boxes of which less than `min_visible` survives (the original
loader's rule, reference §2.6)."""

from __future__ import annotations

import math

import numpy as np

from kosmos2_jax.format.boxes import check_box


def check_boxes(boxes: np.ndarray, where: str) -> None:
    """Normalized (x1, y1, x2, y2) rows, each valid by `kosmos2_jax.format.boxes.check_box`; raises ValueError."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    # Fast path in plain Python (a record has a handful of boxes; this runs once per example in
    # the input pipeline's worker threads, where numpy's per-call overhead holds the GIL).
    if all(0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0 for x1, y1, x2, y2 in boxes.tolist()):
        return
    for box in boxes.tolist():
        check_box(box, where)


def shorter_side_resize_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)`: the shorter side becomes `size`, the longer one is truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision `CenterCrop(size)` offsets (left, top)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def crop_boxes(boxes: np.ndarray, width: int, height: int, size: int, min_visible: float = 0.2):
    """Normalized boxes of a `width` x `height` image -> normalized boxes of its shorter-side resize +
    center crop to `size`, and a keep mask (False where less than `min_visible` of the box's area
    survives the crop)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rw, rh = shorter_side_resize_shape(width, height, size)
    left, top = center_crop_offsets(rw, rh, size)
    px = boxes * np.array([rw, rh, rw, rh]) - np.array([left, top, left, top])
    clipped = np.clip(px, 0, size)
    area = (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1])
    kept_area = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    keep = (area > 0) & (kept_area >= min_visible * np.where(area > 0, area, math.inf))
    return (clipped / size).astype(np.float32), keep
