"""One batch of captioned images -> grounded records: the stages of reference §4.1 in order, shared
by the local loop and the Beam pipeline so both produce the same records.

    caption checks -> image checks -> noun chunks + abstract filter + expressions (spaCy)
    -> detector on each image's chunks -> drop malformed boxes -> NMS over the image -> score > 0.65
    -> expressions not contained in another -> record (or dropped, counted)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time


from kosmos2_jax.grit import text as text_stage_lib
from kosmos2_jax.grit.abstract import ABSTRACT_LEMMAS
from kosmos2_jax.grit.box_selection import DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD, select_boxes
from kosmos2_jax.grit.records import image_file

# Stage counters, in pipeline order (printed and saved in this order).
COUNTERS = ("captions_in", "skipped_empty_caption", "skipped_caption_too_long", "skipped_non_english",
            "skipped_missing_image", "skipped_corrupt_image", "skipped_tiny_image", "chunks", "abstract_filtered",
            "boxes_detected", "boxes_invalid_nan", "boxes_invalid_inverted", "boxes_invalid_out_of_range",
            "removed_by_nms", "below_threshold", "phrases_grounded", "expressions_contained",
            "dropped_no_phrases", "dropped_no_boxes", "written")


@dataclasses.dataclass(frozen=True)
class GritConfig:
    nms_iou: float = DEFAULT_NMS_IOU
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    max_caption_chars: int = 1000
    min_image_side: int = 32
    # A caption is taken as non-English when fewer than this share of its letters are ASCII.
    min_ascii_letters: float = 0.9
    # False: ref_exps holds only the expressions no other one contains (the paper's rule). True: one
    # expression per noun chunk, aligned with the chunks, as in the released GRIT-20M files.
    keep_contained: bool = False
    abstract_lemmas: frozenset = ABSTRACT_LEMMAS


def caption_problem(caption: str, config: GritConfig) -> str | None:
    if not caption or not caption.strip():
        return "skipped_empty_caption"
    if len(caption) > config.max_caption_chars:
        return "skipped_caption_too_long"
    letters = [c for c in caption if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < config.min_ascii_letters * len(letters):
        return "skipped_non_english"
    return None


def open_checked(data: bytes, config: GritConfig):
    """(PIL image, None) or (None, skip reason)."""
    from kosmos2_jax.format.images import ImageError, open_image as open_bytes

    try:
        image = open_bytes(data)
    except ImageError as e:
        return None, "skipped_missing_image" if e.reason == "missing image" else "skipped_corrupt_image"
    if min(image.size) < config.min_image_side:
        return None, "skipped_tiny_image"
    return image, None


def process_batch(items: list[dict], nlp, detector, config: GritConfig = GritConfig(), timings=None):
    """items: dicts from `records.read_inputs` (with `opened`, `open_checked`'s result, when the image
    was decoded ahead). Returns (records, counters); each record has the
    released GRIT columns plus `image_bytes` / `image_ext` to store. `timings` (a Counter), when
    given, gains the seconds spent in each stage: decode, text, detect, select (boxes and records)."""
    counters = collections.Counter()
    clock = _Clock(timings)
    good = []
    for item in items:
        counters["captions_in"] += 1
        reason = caption_problem(item["caption"], config)
        image = None
        if reason is None:  # `opened`: decoded ahead (engine.build_shard), else here
            image, reason = item["opened"] if "opened" in item else open_checked(item["image"], config)
        if reason:
            counters[reason] += 1
            continue
        good.append((item, image))
    clock.lap("decode")
    results = list(text_stage_lib.text_stage(nlp, [it["caption"] for it, _ in good], lemmas=config.abstract_lemmas))
    todo = []
    for (item, image), result in zip(good, results):
        counters["chunks"] += result.chunks
        counters["abstract_filtered"] += result.abstract
        if not result.phrases:
            counters["dropped_no_phrases"] += 1
            continue
        names = list(dict.fromkeys(item["caption"][p.start:p.end] for p in result.phrases))
        todo.append((item, image, result.phrases, names))
    clock.lap("text")
    detections = detector.detect([t[1] for t in todo], [t[3] for t in todo], [t[0]["key"] for t in todo]) if todo else []
    clock.lap("detect")
    records = []
    for (item, image, phrases, names), found in zip(todo, detections):
        kept = dict(zip(names, select_boxes(found, config.nms_iou, config.score_threshold, counters)))
        grounded = [(p, kept[item["caption"][p.start:p.end]]) for p in phrases]
        grounded = [(p, boxes) for p, boxes in grounded if boxes]
        counters["phrases_grounded"] += len(grounded)
        if not grounded:
            counters["dropped_no_boxes"] += 1
            continue
        record = make_record(item, image, grounded, config.keep_contained, counters)
        records.append(record)
        counters["written"] += 1
    clock.lap("select")
    return records, counters


def phrases_to_detect(items, nlp, config: GritConfig = GritConfig()):
    """(key, caption, phrases) of each item whose caption passes the checks: the strings a detector
    is asked about (`process_batch`; images are not read, so their checks are left out)."""
    items = iter(items)
    while batch := list(itertools.islice(items, 1024)):  # streamed: an input of millions of captions
        good = [it for it in batch if caption_problem(it["caption"], config) is None]
        results = text_stage_lib.text_stage(nlp, [it["caption"] for it in good], lemmas=config.abstract_lemmas)
        for item, result in zip(good, results):
            yield item["key"], item["caption"], list(dict.fromkeys(item["caption"][p.start:p.end] for p in result.phrases))


class _Clock:
    def __init__(self, timings):
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[stage] += now - self.t
            self.t = now


def _row(span, box, score):
    return [float(span[0]), float(span[1]), *(float(v) for v in box), float(score)]


def make_record(item: dict, image, grounded, keep_contained: bool, counters) -> dict:
    """grounded: [(Phrase, [(box, score)])] in caption order."""
    maximal = text_stage_lib.keep_maximal([p.expression for p, _ in grounded])
    chunks, exps = [], []
    for (phrase, boxes), keep in zip(grounded, maximal):
        chunks.extend(_row(phrase.chunk, b, s) for b, s in boxes)
        if keep or keep_contained:
            exps.extend(_row(phrase.expression, b, s) for b, s in boxes)
        else:
            counters["expressions_contained"] += 1
    data, ext = image_file(item["image"], image)
    return {"key": item["key"], "caption": item["caption"], "url": item.get("url", ""), "width": image.width,
            "height": image.height, "noun_chunks": chunks, "ref_exps": exps, "image_bytes": data, "image_ext": ext}
