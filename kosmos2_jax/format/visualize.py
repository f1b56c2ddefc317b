"""Draw grounded entities on an image: one colour per entity, each box line edged in black on
both sides, a label with the phrase on a filled tag whose text colour is chosen for contrast, tags
placed so that none covers another: labels and boxes read on any background."""

from __future__ import annotations

import colorsys
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def entity_colours(n: int) -> list[tuple[int, int, int]]:
    """n well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tags(boxes: Sequence[tuple], sizes: Sequence[tuple[int, int]], w: int, h: int) -> list[tuple]:
    """Where each box's label tag goes: (x1, y1, x2, y2) of size `sizes[i]`, inside the image, no
    two overlapping. Tried in order: above the box's top-left corner, just inside it, below the box,
    then the first free row from the top of the image (a picture with more tags than rows may
    overlap, never leave the image)."""
    placed = []
    for box, (tw, th) in zip(boxes, sizes):
        x = min(max(box[0], 0), max(w - tw, 0))
        candidates = [(x, box[1] - th), (x, box[1]), (x, box[3]), (x, box[3] - th)]
        candidates += [(x0, y0) for y0 in range(0, max(h - th, 0) + 1, max(th // 2, 1))
                       for x0 in (x, 0, max(w - tw, 0))]
        inside = [(cx, cy, cx + tw, cy + th) for cx, cy in candidates if 0 <= cy and cy + th <= h]
        free = [r for r in inside if not any(_overlaps(r, p) for p in placed)]
        placed.append(free[0] if free else (inside or [(x, 0, x + tw, th)])[0])
    return placed


def draw_entities(image: Image.Image, entities: Sequence, line_width: int | None = None) -> Image.Image:
    """`entities` as `post_process_generation` returns them (normalized boxes); returns a new RGB
    image. Each box line has a dark edge on both sides (visible on a shape of its own colour); the
    label tags never cover each other (`place_tags`)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line_width = line_width or max(2, round(min(w, h) / 160))
    font = _font(max(12, round(min(w, h) / 28)))
    colours = entity_colours(len(entities))
    scaled = [[(x1 * w, y1 * h, x2 * w, y2 * h) for x1, y1, x2, y2 in boxes] for _, _, boxes in entities]
    for boxes, colour in zip(scaled, colours):
        for x1, y1, x2, y2 in boxes:
            draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=line_width + 2)
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
    pad = max(2, line_width)
    tags = []  # (box, name, colour, text bbox) for every box, in drawing order
    for (name, _, _), boxes, colour in zip(entities, scaled, colours):
        tags += [(box, name, colour, draw.textbbox((0, 0), name, font=font)) for box in boxes]
    sizes = [(int(r - l) + 2 * pad, int(b - t) + 2 * pad) for _, _, _, (l, t, r, b) in tags]
    for (box, name, colour, (left, top, _, _)), (tx, ty, tx2, ty2) in zip(tags, place_tags([t[0] for t in tags], sizes, w, h)):
        draw.rectangle((tx, ty, tx2, ty2), fill=colour, outline=(0, 0, 0))  # labels last: never hidden by a box
        draw.text((tx + pad - left, ty + pad - top), name, fill=_text_colour(colour), font=font)
    return canvas
