"""Box metrics used by the grounding protocols."""

from __future__ import annotations

from typing import Sequence

from kosmos2_jax.format.boxes import iou  # noqa: F401  (the metrics' IoU is the library's one)


def first_box_hit(predicted: Sequence[Sequence[float]], target: Sequence[float], threshold: float = 0.5) -> bool:
    """RefCOCO protocol: the first predicted box counts; no box (a parse failure) is a miss."""
    return bool(predicted) and iou(predicted[0], target) >= threshold


def recall_at_k(predicted: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], k: int,
                threshold: float = 0.5) -> bool:
    """ANY-BOX protocol (MDETR, the official Flickr30k evaluation): a hit when any of the first k
    predicted boxes (all of them when fewer were generated) has IoU >= threshold with any target."""
    return any(iou(p, t) >= threshold for p in list(predicted)[:k] for t in targets)


def merge_boxes(boxes: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """MERGED-BOX protocol: the union box of a phrase's targets."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def recall_at_k_merged(predicted, targets, k: int, threshold: float = 0.5) -> bool:
    return bool(targets) and recall_at_k(predicted, [merge_boxes(targets)], k, threshold)
