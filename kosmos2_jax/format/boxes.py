"""Normalized (x1, y1, x2, y2) boxes: the one validity rule every part uses (processor, input
pipeline, GRIT construction, `predict --box`), and IoU.

A box is valid when its four coordinates are finite, within [0, 1] and x1 < x2, y1 < y2.
`tolerance` widens the range for detector outputs a hair outside the image, which the GRIT box
stage clips.
"""

from __future__ import annotations

import math
from typing import Sequence

from kosmos2_jax.utils.errors import UsageError

PROBLEMS = {
    "not_four": "a box is 4 numbers (x1, y1, x2, y2)",
    "nan": "NaN or infinite coordinates",
    "out_of_range": "outside [0, 1]: boxes are normalized (x1, y1, x2, y2)",
    "inverted": "zero-area or inverted: needs x1 < x2 and y1 < y2",
}


def box_problem(box: Sequence[float], tolerance: float = 0.0) -> str | None:
    """Why `box` is not a valid normalized box (a key of PROBLEMS), or None."""
    try:
        values = [float(c) for c in box]
    except (TypeError, ValueError):
        return "not_four"
    if len(values) != 4:
        return "not_four"
    if not all(math.isfinite(v) for v in values):
        return "nan"
    x1, y1, x2, y2 = values
    if not (x2 > x1 and y2 > y1):
        return "inverted"
    if min(values) < -tolerance or max(values) > 1.0 + tolerance:
        return "out_of_range"
    return None


def check_box(box: Sequence[float], where: str = "") -> tuple[float, float, float, float]:
    """The box as 4 floats, or a ValueError naming it (and `where` it came from) and its problem."""
    problem = box_problem(box)
    if problem:
        raise UsageError(f"{where + ': ' if where else ''}box {tuple(box) if problem != 'not_four' else box!r} "
                         f"is invalid: {PROBLEMS[problem]}")
    x1, y1, x2, y2 = (float(c) for c in box)
    return x1, y1, x2, y2


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when either has no area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0
