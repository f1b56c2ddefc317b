"""Draw grounded entities on an image: one colour per entity, a label with the phrase on a filled
tag whose text colour is chosen for contrast, so labels read on any background."""

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


def draw_entities(image: Image.Image, entities: Sequence, line_width: int | None = None) -> Image.Image:
    """`entities` as `post_process_generation` returns them (normalized boxes); returns a new RGB image."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line_width = line_width or max(2, round(min(w, h) / 160))
    font = _font(max(12, round(min(w, h) / 28)))
    colours = entity_colours(len(entities))
    scaled = [[(x1 * w, y1 * h, x2 * w, y2 * h) for x1, y1, x2, y2 in boxes] for _, _, boxes in entities]
    for boxes, colour in zip(scaled, colours):
        for box in boxes:
            draw.rectangle(box, outline=(0, 0, 0), width=line_width + 2)  # dark halo: visible on light images
            draw.rectangle(box, outline=colour, width=line_width)
    for (name, _, _), boxes, colour in zip(entities, scaled, colours):  # labels last: never hidden by a box
        for box in boxes:
            left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
            pad = max(2, line_width)
            tag_h = bottom - top + 2 * pad
            tx = min(max(box[0], 0), max(w - (right - left) - 2 * pad, 0))
            ty = box[1] - tag_h if box[1] - tag_h >= 0 else box[1]
            draw.rectangle((tx, ty, tx + right - left + 2 * pad, ty + tag_h), fill=colour, outline=(0, 0, 0))
            draw.text((tx + pad - left, ty + pad - top), name, fill=_text_colour(colour), font=font)
    return canvas
