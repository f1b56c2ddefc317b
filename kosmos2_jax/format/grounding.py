"""Boxes <-> location tokens, and grounded text: building it from spans, parsing it back.

Boxes are normalized `(x1, y1, x2, y2)` in [0, 1]. A box is written as two cells of a
`num_bins` x `num_bins` grid, upper-left then lower-right, cell index = row * num_bins + col
(reference §2.4). Two box -> cell formulas exist and both are named here:

- `"hf"`: Hugging Face's processor (inference prompts): ul = floor(c * P), lr = ceil(c * P - 1).
- `"train"`: the original training loader: ul = floor(max(c, 0) * P), lr = floor(min(c, 0.99999) * P).

They differ only when x2 * P or y2 * P is a whole number (a box edge on a grid line).

`post_process_generation` reproduces HF's `Kosmos2Processor.post_process_generation` exactly
(reference §2.5), including its handling of malformed text; it never raises.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from kosmos2_jax.format.boxes import check_box
from kosmos2_jax.format.tokenizer import location_token
from kosmos2_jax.utils.errors import UsageError

Box = tuple[float, float, float, float]
Entity = tuple[str, tuple[int, int], list[Box]]

BOX_FORMULAS = ("hf", "train")
_TRAIN_UPPER = 0.99999
DELIMITER = "</delimiter_of_multi_objects/>"


def box_to_patch_pair(box: Sequence[float], num_bins: int = 32, formula: str = "hf") -> tuple[int, int]:
    """Normalized `(x1, y1, x2, y2)` -> (upper-left cell, lower-right cell) indices."""
    x1, y1, x2, y2 = check_box(box)
    if formula == "hf":
        ul_x, ul_y = math.floor(x1 * num_bins), math.floor(y1 * num_bins)
        lr_x, lr_y = math.ceil(x2 * num_bins - 1), math.ceil(y2 * num_bins - 1)
    elif formula == "train":
        ul_x, ul_y = math.floor(max(x1, 0.0) * num_bins), math.floor(max(y1, 0.0) * num_bins)
        lr_x = math.floor(min(x2, _TRAIN_UPPER) * num_bins)
        lr_y = math.floor(min(y2, _TRAIN_UPPER) * num_bins)
        # x1 = 1.0 cannot happen (x1 < x2 <= 1), so ul stays on the grid.
    else:
        raise UsageError(f"unknown box formula {formula!r}; expected one of {BOX_FORMULAS}")
    return ul_y * num_bins + ul_x, lr_y * num_bins + lr_x


def _pair_to_box(ul: int, lr: int, num_bins: int) -> Box:
    # HF's patch_index_to_coordinate, unchecked: cell extents when the corners share a cell,
    # row or column; cell centres otherwise.
    cell = 1.0 / num_bins
    ul_x, ul_y = ul % num_bins, ul // num_bins
    lr_x, lr_y = lr % num_bins, lr // num_bins
    if ul == lr or ul_x == lr_x or ul_y == lr_y:
        return ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell
    half = cell / 2
    return ul_x * cell + half, ul_y * cell + half, lr_x * cell + half, lr_y * cell + half


def patch_pair_to_box(ul: int, lr: int, num_bins: int = 32) -> Box:
    """(upper-left, lower-right) cell indices -> normalized box, as HF and the original demo decode."""
    for idx in (ul, lr):
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_bins * num_bins:
            raise UsageError(f"location index {idx!r} outside [0, {num_bins * num_bins - 1}]")
    return _pair_to_box(ul, lr, num_bins)


def location_pair_string(pair: tuple[int, int]) -> str:
    return location_token(pair[0]) + location_token(pair[1])


def object_string(pairs: Sequence[tuple[int, int]]) -> str:
    """`<object><patch_index_a><patch_index_b>[</delimiter_of_multi_objects/>...]</object>`."""
    return "<object>" + DELIMITER.join(location_pair_string(p) for p in pairs) + "</object>"


def grounded_caption(caption: str, spans: Sequence[tuple[int, int, Sequence[Sequence[float]]]],
                     num_bins: int = 32, formula: str = "train", grounding_token: bool = True) -> str:
    """Caption + GRIT-style spans `[(char_start, char_end, [boxes])]` -> grounded text.

    Each span becomes `<phrase>text</phrase><object>...</object>`; spans with the same
    (start, end) are merged (their boxes joined by the delimiter). Spans must not overlap:
    choose between nested expressions before calling (the data pipeline's span selection does).
    """
    return "".join(grounded_pieces(caption, spans, num_bins, formula, grounding_token))


def grounded_pieces(caption: str, spans: Sequence[tuple[int, int, Sequence[Sequence[float]]]],
                    num_bins: int = 32, formula: str = "train", grounding_token: bool = True) -> list[str]:
    """`grounded_caption`'s text as a list whose `"".join` it is: caption slices, and each tag and
    location token as its own item (so a tokenizer need not find them again)."""
    grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for span in spans:
        start, end, boxes = span
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(caption)):
            raise UsageError(f"span ({start!r}, {end!r}) is not a non-empty character range of a "
                             f"{len(caption)}-character caption {caption!r}")
        if not boxes:
            raise UsageError(f"span ({start}, {end}) {caption[start:end]!r} has no box")
        pairs = grouped.setdefault((start, end), [])
        pairs.extend(box_to_patch_pair(b, num_bins, formula) for b in boxes)
    ordered = sorted(grouped)
    for (s0, e0), (s1, e1) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise UsageError(f"spans ({s0}, {e0}) {caption[s0:e0]!r} and ({s1}, {e1}) {caption[s1:e1]!r} overlap")
    out, pos = ["<grounding>"] if grounding_token else [], 0
    for start, end in ordered:
        out += (caption[pos:start], "<phrase>", caption[start:end], "</phrase>", "<object>")
        for k, (ul, lr) in enumerate(grouped[(start, end)]):
            if k:
                out.append(DELIMITER)
            out += (location_token(ul), location_token(lr))
        out.append("</object>")
        pos = end
    out.append(caption[pos:])
    return out


# --- parsing generated text (HF post_process_generation) --------------------------------------
_ENTITY_PATTERN = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+>"
    r"</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>")
_INDEX = re.compile(r"<patch_index_(\d+)>")
_ANY_TAG = re.compile(r"<.*?>")


def extract_entities_with_patch_indices(text: str) -> list[tuple[str, tuple[int, int], list[tuple[int, int]]]]:
    """Entities with raw-text spans and (ul, lr) pairs; a bare `<object>` gives one entity per pair."""
    entities = []
    for match in _ENTITY_PATTERN.finditer(text):
        phrase_tag, phrase, content = match.groups()
        pairs = []
        for pair in content.split("</delimiter_of_multi_objects/>"):
            first, second = _INDEX.search(pair), _INDEX.search(pair[1:])
            if first and second:
                pairs.append((int(first.group(1)), int(second.group(1))))
        if phrase_tag:
            entities.append((phrase, match.span(2), pairs))
        else:
            span = (match.start(), match.start())
            entities.extend((f"<patch_index_{a}><patch_index_{b}>", span, [(a, b)]) for a, b in pairs)
    return entities


def clean_text_and_extract_entities(text: str, num_bins: int = 32) -> tuple[str, list[Entity]]:
    processed = _ANY_TAG.sub("", text)
    entities = []
    for name, (start, end), pairs in extract_entities_with_patch_indices(text):
        start = len(_ANY_TAG.sub("", text[:start]))
        end = len(_ANY_TAG.sub("", text[:end]))
        entities.append((name, (start, end), [_pair_to_box(a, b, num_bins) for a, b in pairs]))
    stripped = processed.strip()
    leading = len(processed) - len(processed.lstrip())
    cleaned = []
    for name, (start, end), boxes in entities:
        start += len(name) - len(name.lstrip()) - leading
        end -= leading + len(name) - len(name.rstrip())
        cleaned.append((name.strip(), (start, end), boxes))
    return stripped, cleaned


def post_process_generation(text: str, cleanup_and_extract: bool = True, num_bins: int = 32):
    """Generated text -> `(clean_text, entities)`, entities `(name, (start, end), [boxes])`.

    Only the text after the last `</image>` counts. With `cleanup_and_extract=False` that text is
    returned as is.
    """
    caption = text.split("</image>")[-1]
    if not cleanup_and_extract:
        return caption
    return clean_text_and_extract_entities(caption, num_bins)


def entity_records(entities: Sequence[Entity], width: int, height: int) -> list[dict]:
    """`post_process_generation`'s entities as JSON records: the phrase, its character span in the
    clean text, its boxes in pixels of a `width` x `height` image and normalized."""
    return [{"phrase": name, "span": list(span),
             "boxes": [[round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)]
                       for x1, y1, x2, y2 in boxes],
             "boxes_normalized": [list(b) for b in boxes]} for name, span, boxes in entities]


def post_process_ids(ids: Sequence[int], tokenizer, cleanup_and_extract: bool = True):
    """`post_process_generation` on generated ids (decoded with special tokens skipped, as HF does)."""
    num_bins = math.isqrt(tokenizer.num_location_tokens)
    return post_process_generation(tokenizer.decode(ids, skip_special_tokens=True), cleanup_and_extract, num_bins)
