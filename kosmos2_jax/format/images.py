"""The one image opener and the one CLIP normalization.

The opener: bytes or a file path -> a PIL image, or `ImageError` with a short reason
("missing image", "undecodable image") that each caller maps to its own handling (the input
pipeline skips and counts the record, GRIT construction counts a skip reason, evaluation marks
the item missing, `predict` and the processor stop with the message)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from kosmos2_jax.utils.errors import UsageError

# CLIP's pixel mean and std (HF's CLIPImageProcessor, KOSMOS-2's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class ImageError(UsageError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def open_image(source: bytes | str | os.PathLike, decode: bool = True) -> Image.Image:
    """An image from its encoded bytes or a file. `decode=False` reads only the header (size and
    mode; `to_rgb` decodes later); otherwise the pixels are decoded now, so a truncated file fails here."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageError("missing image", f"image file not found: {path!r}")
        with open(path, "rb") as f:
            source = f.read()
        where = f"cannot read image {path!r}"
    else:
        where = "cannot decode the image"
    if not source:
        raise ImageError("missing image", "no image bytes")
    try:
        image = Image.open(io.BytesIO(source))
        if decode:
            image.load()
        return image
    except _DECODE_ERRORS as e:
        why = "not an image format PIL reads (JPEG, PNG, WebP, ...)" if isinstance(e, UnidentifiedImageError) else e
        raise ImageError("undecodable image", f"{where}: {why}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The decoded RGB image (an RGB image is not copied)."""
    try:
        with image:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ImageError("undecodable image", str(e)) from None


def normalize_pixels(pixels, xp=np, dtype=np.float32):
    """uint8 RGB -> CLIP-normalized `(x / 255 - mean) / std`, computed in `dtype` (`xp`: numpy or
    jax.numpy). The processor computes in float64 and rounds once, as HF's processor does; the
    training step in float32, on the device."""
    x = xp.asarray(pixels).astype(dtype) / xp.asarray(255.0, dtype)
    return (x - xp.asarray(CLIP_MEAN, dtype)) / xp.asarray(CLIP_STD, dtype)
