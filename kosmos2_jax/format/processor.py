"""Text + images + boxes -> model inputs, as Hugging Face's `Kosmos2Processor` builds them.

A prompt with an image becomes (reference §2.2)

    <s> <image> [64 image slots, ids 4..67] </image> <text with boxes written in>

with `image_embeds_position_mask` = 1 exactly on the 64 slots. Boxes passed in `bboxes` are
written after their `<phrase>...</phrase>` as `<object><patch_index_UL><patch_index_LR>...</object>`
(reference §2.3). Images are resized straight to a square (bicubic, no crop) and CLIP-normalized
(reference §2.6); `pixel_values` are NHWC float32.

`encode_grounded_caption` turns a GRIT-style record (caption + character spans + boxes) into the
training sequence and its loss mask (reference §1.8, §4.3).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from kosmos2_jax.format import grounding
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

from kosmos2_jax.format.images import normalize_pixels
from kosmos2_jax.utils.errors import UsageError
_PHRASE = re.compile(r"<phrase>.+?</phrase>")


# --- images -----------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; a missing or undecodable file raises ValueError naming it."""
    from kosmos2_jax.format.images import ImageError, open_image, to_rgb

    try:
        return to_rgb(open_image(path))
    except ImageError as e:
        raise UsageError(e.detail) from None


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise UsageError(f"an image array must be uint8 HxW or HxWxC (C in 1, 3, 4); got {image.dtype} {image.shape}")
        return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).convert("RGB")
    raise UsageError(f"unsupported image {type(image).__name__}: pass a PIL image, a uint8 array or a file path")


def preprocess_image(image: Any, image_size: int = 224) -> np.ndarray:
    """One image -> [image_size, image_size, 3] float32: square bicubic resize, /255, CLIP mean/std."""
    pil = _as_pil(image).resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    return normalize_pixels(np.asarray(pil), np, np.float64).astype(np.float32)


# --- boxes in prompts -------------------------------------------------------------------------
def _is_index_pair(box: Any) -> bool:
    return isinstance(box, tuple) and len(box) == 2 and all(isinstance(c, int) and not isinstance(c, bool) for c in box)


def _is_coordinates(box: Any) -> bool:
    return isinstance(box, tuple) and len(box) == 4 and all(isinstance(c, float) for c in box)


def _boxes_of_phrase(entry: Any) -> list:
    """One element of a text's `bboxes`: None, a box, or a list of boxes -> list of boxes."""
    if entry is None:
        return []
    boxes = entry if isinstance(entry, list) else [entry]
    for box in boxes:
        if not (_is_index_pair(box) or _is_coordinates(box)):
            raise UsageError(
                f"bad box {box!r}: each box is a tuple of 2 ints (cell indices) or 4 floats "
                "(normalized x1, y1, x2, y2); a phrase takes None, one box or a list of boxes")
    return boxes


class Kosmos2Processor:
    """Prompts (text, optional images, optional boxes) -> numpy model inputs."""

    def __init__(self, tokenizer: Kosmos2Tokenizer, image_size: int = 224, num_image_tokens: int = 64,
                 box_formula: str = "hf"):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.box_formula = box_formula
        self.num_bins = math.isqrt(tokenizer.num_location_tokens)
        if self.num_bins ** 2 != tokenizer.num_location_tokens:
            raise UsageError(f"{tokenizer.num_location_tokens} location tokens do not form a square grid")
        # The slots' ids are arbitrary (their embeddings are overwritten by the image); HF and the
        # original code use the ids right after <unk>.
        self.image_slot_ids = list(range(tokenizer.unk_id + 1, tokenizer.unk_id + 1 + num_image_tokens))

    # --- text -----------------------------------------------------------------------------
    def box_tokens(self, box: tuple) -> str:
        pair = box if _is_index_pair(box) else grounding.box_to_patch_pair(box, self.num_bins, self.box_formula)
        for idx in pair:
            if not 0 <= idx < self.tokenizer.num_location_tokens:
                raise UsageError(f"location index {idx} in box {box!r} outside [0, {self.tokenizer.num_location_tokens - 1}]")
        return grounding.location_pair_string(pair)

    def insert_boxes(self, text: str, bboxes: Sequence[Any] | None) -> str:
        """Write `<object>...</object>` after each `<phrase>...</phrase>` of `text`."""
        if bboxes is None or len(bboxes) == 0:
            return text
        if not isinstance(bboxes, list):
            raise UsageError(f"bboxes for one text must be None or a list (one entry per phrase), got {bboxes!r}")
        phrases = list(_PHRASE.finditer(text))
        if len(phrases) != len(bboxes):
            raise UsageError(f"{len(bboxes)} box entries for {len(phrases)} <phrase>...</phrase> pairs in {text!r}: "
                             "give one entry (None, a box or a list of boxes) per phrase")
        out, pos = [], 0
        for match, entry in zip(phrases, bboxes):
            out.append(text[pos:match.end()])
            pos = match.end()
            boxes = _boxes_of_phrase(entry)
            if boxes:
                out.append("<object>" + "</delimiter_of_multi_objects/>".join(self.box_tokens(b) for b in boxes) + "</object>")
        out.append(text[pos:])
        return "".join(out)

    def encode_prompt(self, text: str, with_image: bool, bboxes: Sequence[Any] | None = None,
                      add_eos_token: bool = False, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """One prompt -> (input_ids, image_embeds_position_mask)."""
        ids = self.tokenizer.encode(self.insert_boxes(text.strip(), bboxes))
        return self.add_special_ids(ids, with_image, add_eos_token, add_special_tokens)

    def add_special_ids(self, ids: list[int], with_image: bool, add_eos_token: bool = False,
                        add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """A prompt's text ids -> (input_ids, image_embeds_position_mask) with `<s>`, the image
        slots and `</s>` as `encode_prompt` adds them."""
        tok = self.tokenizer
        mask = [0] * len(ids)
        if with_image:
            ids = [tok.image_id, *self.image_slot_ids, tok.end_image_id] + ids
            mask = [0] + [1] * self.num_image_tokens + [0] + mask
        if add_special_tokens:
            ids, mask = [tok.bos_id] + ids, [0] + mask
            if add_eos_token:
                ids, mask = ids + [tok.eos_id], mask + [0]
        return ids, mask

    def encode_interleaved(self, parts: Sequence[Any]) -> tuple[list[int], list[int], list[Any]]:
        """An interleaved prompt -> (input_ids, image_embeds_position_mask, images in order).

        `parts` mixes images (PIL images or uint8 arrays; an image becomes `<image>` + slots +
        `</image>`) and texts (a string, or `(string, bboxes)` to write boxes after its phrases).
        Each text is tokenized on its own, as the text after the image of `encode_prompt` is, so
        `[image, text]` encodes exactly as `encode_prompt(text, with_image=True)`. KOSMOS-2 reads
        such sequences in few-shot prompts (demonstration images, then the query's).
        """
        tok = self.tokenizer
        ids, mask, images = [tok.bos_id], [0], []
        for part in parts:
            if isinstance(part, (Image.Image, np.ndarray)):
                images.append(part)
                ids += [tok.image_id, *self.image_slot_ids, tok.end_image_id]
                mask += [0] + [1] * self.num_image_tokens + [0]
                continue
            if isinstance(part, str):
                text, boxes = part, None
            elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str):
                text, boxes = part
            else:
                raise UsageError(f"bad interleaved part {type(part).__name__}: give a PIL image or uint8 array, "
                                 "a string, or a (string, bboxes) pair")
            piece = tok.encode(self.insert_boxes(text.strip(), boxes))
            ids += piece
            mask += [0] * len(piece)
        return ids, mask, images

    def interleaved(self, prompts: Sequence[Sequence[Any]], padding_side: str = "left") -> dict[str, np.ndarray]:
        """A batch of interleaved prompts (see `encode_interleaved`), every row with the same number
        N >= 1 of images -> model inputs with `pixel_values` [B, N, H, W, 3]."""
        rows = [self.encode_interleaved(p) for p in prompts]
        counts = {len(images) for _, _, images in rows}
        if len(counts) != 1 or 0 in counts:
            raise UsageError(f"every interleaved prompt of a batch needs the same number (>= 1) of images, got {sorted(counts)}")
        out = self._pad_rows([(ids, mask) for ids, mask, _ in rows], padding_side)
        out["pixel_values"] = np.stack([np.stack([preprocess_image(im, self.image_size) for im in images])
                                        for _, _, images in rows])
        return out

    def _pad_rows(self, rows: Sequence[tuple[list[int], list[int]]], padding_side: str) -> dict[str, np.ndarray]:
        if padding_side not in ("right", "left"):
            raise UsageError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        length = max(len(ids) for ids, _ in rows)
        out = {k: np.zeros((len(rows), length), np.int32) for k in ("input_ids", "attention_mask", "image_embeds_position_mask")}
        out["input_ids"][:] = self.tokenizer.pad_id
        for i, (ids, mask) in enumerate(rows):
            cols = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            out["input_ids"][i, cols] = ids
            out["attention_mask"][i, cols] = 1
            out["image_embeds_position_mask"][i, cols] = mask
        return out

    # --- the HF processor call ------------------------------------------------------------
    def __call__(self, text: str | Sequence[str], images: Any = None, bboxes: Any = None,
                 add_eos_token: bool = False, padding_side: str = "right",
                 add_special_tokens: bool = True) -> dict[str, np.ndarray]:
        """Returns `input_ids`, `attention_mask`, `image_embeds_position_mask` ([B, L] int32) and,
        with images, `pixel_values` ([B, H, W, 3] float32). A single string is a batch of one.
        Rows are padded with `<pad>` to the longest, on `padding_side`."""
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UsageError(f"text must be a string or a non-empty list of strings, got {text!r}")
        if images is not None:
            image_list = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(image_list) != len(texts):
                raise UsageError(f"{len(texts)} texts but {len(image_list)} images: give one image per text")
        if bboxes is None:
            box_list = [None] * len(texts)
        elif batched:
            if not isinstance(bboxes, list) or len(bboxes) != len(texts):
                raise UsageError(f"for a batch of {len(texts)} texts, bboxes must be a list with one entry per text")
            box_list = bboxes
        else:
            box_list = [bboxes]
        rows = [self.encode_prompt(t, images is not None, b, add_eos_token, add_special_tokens)
                for t, b in zip(texts, box_list)]
        out = self._pad_rows(rows, padding_side)
        if images is not None:
            out["pixel_values"] = np.stack([preprocess_image(im, self.image_size) for im in image_list])
        return out

    # --- outputs --------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(batch, skip_special_tokens)

    def post_process_generation(self, text: str, cleanup_and_extract: bool = True):
        return grounding.post_process_generation(text, cleanup_and_extract, self.num_bins)


def processor_for(spm_path: str, model, **options) -> Kosmos2Processor:
    """The processor a model's inputs need: its image size and image-token count, and the tokenizer
    with as many location tokens as its vocabulary holds (`tokenizer_for`; a UsageError when the
    sentencepiece model does not fit it). `model`: a Kosmos2 or its config."""
    from kosmos2_jax.format.tokenizer import tokenizer_for

    config = getattr(model, "config", model)
    return Kosmos2Processor(tokenizer_for(spm_path, config), image_size=config.vision.image_size,
                            num_image_tokens=config.latent_query_num, **options)


# --- training sequences from GRIT-style records -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroundedSequence:
    """A training sequence. `loss_mask[j]` = 1 when token j is a target (predicted from the tokens
    before it): the loss covers `<grounding>`, text, tags, locations and `</s>`, never `<s>`,
    `<image>`, the image slots or `</image>`. Train on `logits[:-1]` vs `input_ids[1:]` with
    `loss_mask[1:]`."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_embeds_position_mask: np.ndarray
    text: str


def encode_grounded_caption(processor: Kosmos2Processor, caption: str,
                            spans: Sequence[tuple[int, int, Sequence[Sequence[float]]]] = (),
                            grounded: bool = True, with_image: bool = True, box_formula: str = "train",
                            add_eos: bool = True) -> GroundedSequence:
    """Caption + spans `[(char_start, char_end, [boxes])]` -> ids, loss mask and image mask.

    With `grounded`, phrases and their boxes are written in and `<grounding>` is prepended (the
    official loader's grounded form); otherwise the plain caption is used and `spans` ignored.
    Boxes use `box_formula` ("train", the original loader's, by default).
    """
    if grounded and spans and "<" not in caption:  # the tags are known: skip finding them in the text again
        pieces = grounding.grounded_pieces(caption, spans, processor.num_bins, box_formula)
        text = "".join(pieces)
        ids, image_mask = processor.add_special_ids(processor.tokenizer.encode_pieces(pieces), with_image, add_eos)
    else:
        text = (grounding.grounded_caption(caption, spans, processor.num_bins, box_formula) if grounded and spans
                else ("<grounding>" + caption if grounded else caption))
        ids, image_mask = processor.encode_prompt(text, with_image, None, add_eos_token=add_eos)
    prefix = 1 + (processor.num_image_tokens + 2 if with_image else 0)  # <s> [<image> slots </image>]
    loss_mask = np.ones(len(ids), np.int32)
    loss_mask[:prefix] = 0
    return GroundedSequence(np.array(ids, np.int32), loss_mask, np.array(image_mask, np.int32), text)
