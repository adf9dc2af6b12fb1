"""Uploaded images and masks: base64 text or PNG bytes -> arrays, or a 422 that says what is wrong with them."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from server.service import ServiceError

DATA_URL_PREFIX = "data:image/png;base64,"
WHITE = 128  # mask pixels of at least this luminance are repainted


def from_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 field (a PNG data URL's prefix dropped)."""
    if text.startswith(DATA_URL_PREFIX):
        text = text[len(DATA_URL_PREFIX) :]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(422, f"{field} is not base64: {exc}") from exc


def open_png(data: bytes, field: str, size: tuple[int, int]) -> Image.Image:
    """A PNG of `size` (width, height), read; anything else is a 422 naming `field`."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL says UnidentifiedImageError, or a decompression-bomb or truncation error
        raise ServiceError(422, f"{field} is not a PNG image: {exc}") from exc
    if image.format != "PNG":
        raise ServiceError(422, f"{field} is a {image.format} image; send a PNG")
    if image.size != size:
        width, height = image.size
        raise ServiceError(422, f"{field} is {width}x{height}; it must be {size[0]}x{size[1]}")
    try:
        image.load()
    except Exception as exc:
        raise ServiceError(422, f"{field} is a damaged PNG: {exc}") from exc
    return image


def read_image(data: bytes, side: int, field: str = "image") -> np.ndarray:
    """uint8 (side, side, 3) from a PNG of the model's size; an alpha channel is dropped."""
    return np.asarray(open_png(data, field, (side, side)).convert("RGB"))


def read_mask(data: bytes, side: int, field: str = "mask") -> np.ndarray:
    """bool (side, side) from a PNG mask of the image's size: True (repaint) where it is white."""
    return np.asarray(open_png(data, field, (side, side)).convert("L")) >= WHITE


def read_openai_mask(data: bytes, side: int, field: str = "mask") -> np.ndarray:
    """An OpenAI Images API mask: where a mask with an alpha channel is fully transparent, as OpenAI reads it;
    a mask without one, where it is white."""
    image = open_png(data, field, (side, side))
    if "A" not in image.getbands() and "transparency" not in image.info:
        return np.asarray(image.convert("L")) >= WHITE
    return np.asarray(image.convert("RGBA"))[..., 3] == 0
