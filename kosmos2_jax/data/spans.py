"""Which grounded spans of a GRIT record are written into its training caption (reference §4.3)."""

from __future__ import annotations

import numpy as np

from kosmos2_jax.utils.errors import UsageError

SPAN_MODES = ("expression", "noun_chunk")


def select_spans(caption: str, noun_chunks: np.ndarray, ref_exps: np.ndarray, mode: str = "expression",
                 score_threshold: float = 0.65) -> list[tuple[int, int, list[tuple[float, ...]]]]:
    """Rows `[start, end, x1, y1, x2, y2, score]` -> `[(start, end, [boxes])]` sorted by start.

    Rows scoring below the threshold are dropped; rows on the same span are grouped. In
    `expression` mode (the released setting) a span contained in another, different span is dropped
    ("a field" inside "a dog in a field"); `noun_chunk` mode uses the noun chunks as they are. Of two
    partially overlapping spans the earlier one is kept.
    """
    if mode not in SPAN_MODES:
        raise UsageError(f"unknown span mode {mode!r}; expected one of {SPAN_MODES}")
    rows = np.asarray(ref_exps if mode == "expression" else noun_chunks, np.float64).reshape(-1, 7)
    grouped: dict[tuple[int, int], list[tuple[float, ...]]] = {}
    for row in rows.tolist():
        if row[6] < score_threshold:
            continue
        start, end = int(row[0]), int(row[1])
        if not 0 <= start < end <= len(caption):
            raise UsageError(f"span ({start}, {end}) outside the {len(caption)}-character caption")
        grouped.setdefault((start, end), []).append(tuple(row[2:6]))
    spans = sorted(grouped)
    if mode == "expression":
        spans = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    kept, last_end = [], -1
    for start, end in spans:
        if start >= last_end:
            kept.append((start, end, grouped[(start, end)]))
            last_end = end
    return kept
