"""One record -> one fixed-length training example (numpy), or `BadRecord` with the reason.

Example fields: `input_ids`, `attention_mask`, `loss_mask`, `image_embeds_position_mask` ([L]
int32), `pixel_values` ([S, S, 3] uint8 RGB after the resize/crop; zeros for text-only rows) and
`has_image`. The CLIP normalization runs on the accelerator (`normalize_pixels`, applied by the
trainer to uint8 batches): a quarter of the bytes to copy and none of the float work on the host,
which is what the input pipeline's throughput is bound by.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from kosmos2_jax.format import images
from kosmos2_jax.data.crop import center_crop_offsets, check_boxes, crop_boxes, shorter_side_resize_shape
from kosmos2_jax.data.example_random import ExampleRandom
from kosmos2_jax.data.spans import select_spans
from kosmos2_jax.format.processor import Kosmos2Processor, encode_grounded_caption
from kosmos2_jax.utils.errors import UsageError

PREPROCESS_MODES = ("square", "resize_shorter_center_crop")


class BadRecord(ValueError):
    """A record the pipeline skips (and counts); `reason` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    seq_len: int = 128
    preprocess: str = "square"  # official inference; "resize_shorter_center_crop" as pretraining
    span_mode: str = "expression"
    score_threshold: float = 0.65
    grounded_prob: float = 0.5  # the released setting (use_object_bbox_prob)
    box_formula: str = "train"
    min_visible: float = 0.2

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise UsageError(f"preprocess {self.preprocess!r} not in {PREPROCESS_MODES}")


def read_header(data: bytes) -> Image.Image:
    """Reads only the image's header (its size and mode); `load_rgb` decodes the pixels."""
    try:
        return images.open_image(data, decode=False)
    except images.ImageError as e:
        raise BadRecord(e.reason, e.detail if e.reason != "missing image" else "") from None


def load_rgb(image: Image.Image) -> Image.Image:
    try:
        return images.to_rgb(image)
    except images.ImageError as e:
        raise BadRecord(e.reason, e.detail) from None


def decode_image(data: bytes) -> Image.Image:
    return load_rgb(read_header(data))


def preprocess(image: Image.Image, size: int, mode: str, boxes: np.ndarray, min_visible: float):
    """Image -> ([size, size, 3] uint8, remapped boxes, keep mask)."""
    return (resize_pixels(image, size, mode),) + remap_boxes(boxes, image.size, size, mode, min_visible)


def remap_boxes(boxes: np.ndarray, image_size: tuple[int, int], size: int, mode: str, min_visible: float):
    """Boxes of a `image_size` (w, h) image -> (boxes after `resize_pixels`, keep mask)."""
    if mode == "square":
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.ones(len(boxes), bool)
    return crop_boxes(boxes, *image_size, size, min_visible)


def resize_pixels(image: Image.Image, size: int, mode: str) -> np.ndarray:
    """Image -> [size, size, 3] uint8: a bicubic resize to the square (`square`), or of the shorter
    side followed by a center crop (`resize_shorter_center_crop`)."""
    if mode == "square":
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
    w, h = image.size
    rw, rh = shorter_side_resize_shape(w, h, size)
    left, top = center_crop_offsets(rw, rh, size)
    return np.asarray(image.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size)),
                      np.uint8)


def _pad(seq, processor: Kosmos2Processor, seq_len: int, pixels, has_image: bool) -> dict:
    n = min(len(seq.input_ids), seq_len)
    rows = np.zeros((4, seq_len), np.int32)  # one allocation for the four token fields
    rows[0, n:] = processor.tokenizer.pad_id
    rows[0, :n] = seq.input_ids[:n]
    rows[1, :n] = 1
    rows[2, :n] = seq.loss_mask[:n]
    rows[3, :n] = seq.image_embeds_position_mask[:n]
    return {"input_ids": rows[0], "attention_mask": rows[1], "loss_mask": rows[2],
            "image_embeds_position_mask": rows[3], "pixel_values": pixels, "has_image": np.int32(has_image)}


def grit_example(record: dict, processor: Kosmos2Processor, config: ExampleConfig, rng: ExampleRandom) -> dict:
    """A GRIT-style record (caption, image bytes, noun_chunks, ref_exps) -> example."""
    return _grit_pixels(*_grit_text(record, processor, config, rng), processor, config)


def grit_examples(records: list[dict], processor: Kosmos2Processor, config: ExampleConfig,
                  rngs: list[ExampleRandom]) -> list[dict | BadRecord]:
    """`grit_example` of each record, or the `BadRecord` it raised. The text work of all records
    (spans, boxes, ids) runs before any image is decoded, so an image decode does not evict the
    tokenizer's tables between captions (A/B in the input pipeline, 8 records at a time: +2.5%
    and +4.5% examples/s in two runs)."""
    texts = [bad_record_or(_grit_text, record, processor, config, rng) for record, rng in zip(records, rngs)]
    return [t if isinstance(t, BadRecord) else bad_record_or(_grit_pixels, *t, processor, config) for t in texts]


def bad_record_or(fn, *args):
    """`fn(*args)`, or the `BadRecord` it raised (the pipeline counts it and moves on)."""
    try:
        return fn(*args)
    except BadRecord as e:
        return e


def _grit_text(record: dict, processor: Kosmos2Processor, config: ExampleConfig, rng: ExampleRandom):
    """Everything of `grit_example` but the pixels: (the sequence, the opened image)."""
    caption = record["caption"]
    caption = caption.decode() if isinstance(caption, bytes) else str(caption)
    if not caption.strip():
        raise BadRecord("empty caption")
    min_image_slots = processor.num_image_tokens + 3
    if config.seq_len <= min_image_slots:
        raise UsageError(f"seq_len {config.seq_len} leaves no room for text after {min_image_slots} image tokens")
    spans = _record_spans(record, caption, config)
    image = read_header(record["image"])
    flat = np.asarray([b for _, _, boxes in spans for b in boxes], np.float32).reshape(-1, 4)
    flat, keep = remap_boxes(flat, image.size, processor.image_size, config.preprocess, config.min_visible)
    remapped, i, flat, keep = [], 0, flat.tolist(), keep.tolist()
    for start, end, boxes in spans:
        kept = [tuple(box) for box, k in zip(flat[i:i + len(boxes)], keep[i:i + len(boxes)]) if k]
        i += len(boxes)
        if kept:
            remapped.append((start, end, kept))
    grounded = bool(remapped) and rng.random() < config.grounded_prob
    seq = encode_grounded_caption(processor, caption, remapped if grounded else (), grounded=grounded,
                                  with_image=True, box_formula=config.box_formula)
    return seq, image


def _grit_pixels(seq, image: Image.Image, processor: Kosmos2Processor, config: ExampleConfig) -> dict:
    pixels = resize_pixels(load_rgb(image), processor.image_size, config.preprocess)
    return _pad(seq, processor, config.seq_len, pixels, True)


def text_example(line: str | bytes, processor: Kosmos2Processor, config: ExampleConfig) -> dict:
    """A plain text line -> `<s> text </s>` with loss on everything after `<s>`, no image."""
    text = line.decode() if isinstance(line, bytes) else str(line)
    if not text.strip():
        raise BadRecord("empty text")
    seq = encode_grounded_caption(processor, text, (), grounded=False, with_image=False)
    size = processor.image_size
    return _pad(seq, processor, config.seq_len, np.zeros((size, size, 3), np.uint8), False)


def language_instruction_example(record: dict, processor: Kosmos2Processor, config: ExampleConfig) -> dict:
    """A text-only instruction (`data.instruct.load_language_instructions`) -> `<s> prompt answer
    </s>`, loss on the answer and `</s>` only, no image."""
    from kosmos2_jax.data.instruct import instruction_sequence

    if "bad" in record:
        raise BadRecord(record["bad"])
    prompt, answer = str(record.get("prompt") or ""), str(record.get("answer") or "")
    if not prompt.strip():
        raise BadRecord("empty instruction")
    if not answer.strip():
        raise BadRecord("instruction with no answer")
    size = processor.image_size
    return _pad(instruction_sequence(processor, [(prompt, answer)], with_image=False), processor, config.seq_len,
                np.zeros((size, size, 3), np.uint8), False)


def _record_spans(record: dict, caption: str, config: ExampleConfig):
    chunks = np.asarray(record.get("noun_chunks", np.zeros((0, 7))), np.float32).reshape(-1, 7)
    exps = np.asarray(record.get("ref_exps", np.zeros((0, 7))), np.float32).reshape(-1, 7)
    try:
        for name, rows in (("noun_chunks", chunks), ("ref_exps", exps)):
            check_boxes(rows[:, 2:6], name)
        return select_spans(caption, chunks, exps, config.span_mode, config.score_threshold)
    except ValueError as e:
        raise BadRecord("bad box or span", str(e)) from None


def grit_instruction_example(record: dict, processor: Kosmos2Processor, config: ExampleConfig,
                             rng: ExampleRandom) -> dict:
    """A GRIT-style record -> one grounded instruction about one of its expressions (Table 9)."""
    from kosmos2_jax.data.instruct import grounded_instruction_turn, instruction_sequence

    caption = record["caption"]
    caption = caption.decode() if isinstance(caption, bytes) else str(caption)
    spans = _record_spans(record, caption, config)
    image = decode_image(record["image"])
    if not spans:
        raise BadRecord("no grounded span")
    start, end, boxes = spans[rng.integers(len(spans))]
    pixels, boxes, keep = preprocess(image, processor.image_size, config.preprocess,
                                     np.asarray(boxes, np.float32), config.min_visible)
    boxes = [tuple(b) for b, k in zip(boxes, keep) if k]
    if not boxes:
        raise BadRecord("no box survives the crop")
    turn = grounded_instruction_turn(caption[start:end], boxes, processor.num_bins, rng, config.box_formula)
    return _pad(instruction_sequence(processor, [turn]), processor, config.seq_len, pixels, True)


def llava_example(record: dict, image_dir: str, processor: Kosmos2Processor, config: ExampleConfig) -> dict:
    """A LLaVA-Instruct conversation (image file under `image_dir`) -> example, loss on the answers."""
    import os

    from kosmos2_jax.data.instruct import instruction_sequence, llava_turns

    turns = llava_turns(record.get("conversations", []))
    if not turns:
        raise BadRecord("no question/answer turn")
    path = os.path.join(image_dir, str(record.get("image", "")))
    data = open(path, "rb").read() if record.get("image") and os.path.isfile(path) else b""
    pixels, _, _ = preprocess(decode_image(data), processor.image_size, config.preprocess, np.zeros((0, 4)),
                              config.min_visible)
    return _pad(instruction_sequence(processor, turns), processor, config.seq_len, pixels, True)
