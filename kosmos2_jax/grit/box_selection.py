"""The box stage of GRIT construction: drop malformed detector boxes, class-agnostic NMS over all
boxes of an image (every phrase's together, as the paper does), then keep pairs scoring above the
threshold.

The paper never published its NMS IoU threshold. The released example record bounds it: its two
boxes ("a wire hanger" 0.675, "a paper cover" 0.793) overlap with IoU 0.688 and both survived, so
the threshold was at least 0.69. The default here is 0.7.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

from kosmos2_jax.format import boxes as box_rules

DEFAULT_NMS_IOU = 0.7
DEFAULT_SCORE_THRESHOLD = 0.65


def box_problem(box: Sequence[float], score: float) -> str | None:
    """Why a detector output is unusable ('nan', 'inverted', 'out_of_range'), or None: the library's
    box rule (kosmos2_jax/format/boxes.py) with coordinates up to 0.01 outside [0, 1] allowed (they are
    clipped), and a finite score."""
    problem = box_rules.box_problem(box, tolerance=0.01)
    if problem == "not_four" or (problem is None and not math.isfinite(score)):
        return "nan"
    return problem


def nms(boxes: Sequence[Sequence[float]], scores: Sequence[float], iou_threshold: float) -> list[int]:
    """Indices kept by greedy NMS, highest score first; a box is suppressed when its IoU with a kept
    box is > iou_threshold. Ties keep the earlier box."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(box_rules.iou(boxes[i], boxes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def select_boxes(detections: Sequence[Sequence[tuple]], nms_iou: float = DEFAULT_NMS_IOU,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD, counters: collections.Counter | None = None):
    """detections[p] = [(box, score), ...] for phrase p of one image -> the same layout holding the
    surviving (clipped box, score) pairs. Counts 'boxes_detected', 'boxes_invalid', 'removed_by_nms',
    'below_threshold' in `counters`."""
    counters = counters if counters is not None else collections.Counter()
    flat = []  # (phrase, box, score)
    for p, pairs in enumerate(detections):
        for box, score in pairs:
            counters["boxes_detected"] += 1
            problem = box_problem(list(map(float, box)), float(score))
            if problem:
                counters[f"boxes_invalid_{problem}"] += 1
                continue
            flat.append((p, tuple(min(max(float(v), 0.0), 1.0) for v in box), float(score)))
    kept = set(nms([f[1] for f in flat], [f[2] for f in flat], nms_iou))
    counters["removed_by_nms"] += len(flat) - len(kept)
    out = [[] for _ in detections]
    for i in sorted(kept, key=lambda i: (-flat[i][2], i)):
        p, box, score = flat[i]
        if score > score_threshold:
            out[p].append((box, score))
        else:
            counters["below_threshold"] += 1
    return out
