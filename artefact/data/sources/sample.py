"""The record every raw source yields, and the checks applied to it.

Images stay lazily opened PIL images so that ``prepare`` can decode one at a time and
shrink large ones while decoding, instead of holding a whole data set in memory.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from artefact.config import DataConfig
from artefact.errors import UserError
from artefact.taxonomy import VALID_MASK_VALUES

DEFAULT_MAX_PIXELS = DataConfig.max_pixels
"""The largest ARTeFACT image is ~133 MP and its card allows ~244 MP; refuse beyond this."""

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass
class Sample:
    """One annotated artwork: a lazily opened image and index mask plus metadata."""

    id: str
    image: Image.Image
    mask: Image.Image
    material: str
    content: str
    group: str
    """The source image this sample comes from; a split never separates one group."""


def check_id(sample_id: object, where: str) -> str:
    """Ids become file names, so only plain names are accepted (no paths, no NUL)."""
    if not isinstance(sample_id, str) or not _SAFE_ID.fullmatch(sample_id) or ".." in sample_id:
        raise UserError(
            f"{where}: id {sample_id!r} is not a safe file name. Ids may use letters, digits,"
            " '.', '_' and '-' only (no path separators, '..' or NUL bytes); rename the row."
        )
    return sample_id


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's decompression-bomb bound for one open call, never disable it."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(source: Path | BinaryIO, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (not decode) an image, with a clear error for corrupt files and bombs."""
    try:
        with _pixel_limit(max_pixels):
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserError(
            f"{where}: the image declares more than {max_pixels:,} pixels ({error}). If it is"
            " genuine, raise data.max_pixels (prepare --max-pixels)."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{where}: cannot read the image ({error}); replace or remove the file.") from None
    if image.width * image.height > max_pixels:
        raise UserError(
            f"{where}: the image is {image.width}x{image.height}, above the bound of"
            f" {max_pixels:,} pixels; raise data.max_pixels (prepare --max-pixels) if it is genuine."
        )
    return image


def decode(image: Image.Image, where: str) -> Image.Image:
    """Force decoding, turning truncated or corrupt data into a UserError."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{where}: the image data is corrupt or truncated ({error}); replace the file.") from None
    return image


MASK_MODES = ("L", "P", "1", "I;16", "I")
"""Single-channel modes an index mask can come in: ``datasets`` stores a bool array as a
mode-1 PNG and a uint16 or int32 one as a TIFF of mode I;16 or I."""


def check_mask(mask: Image.Image, image_size: tuple[int, int], where: str) -> None:
    """An index mask: one channel, the image's size (checked before decoding)."""
    if mask.mode not in MASK_MODES:
        raise UserError(
            f"{where}: the annotation has mode {mask.mode!r}, but a single-channel index mask"
            f" (mode {', '.join(MASK_MODES)}) is expected. Use the `annotation` column, not `annotation_rgb`."
        )
    if mask.size != image_size:
        raise UserError(
            f"{where}: the annotation is {mask.size[0]}x{mask.size[1]} but the image is"
            f" {image_size[0]}x{image_size[1]}; they must match pixel for pixel."
        )


def class_ids(mask: Image.Image, where: str) -> Image.Image:
    """Decode a mask that passed ``check_mask`` into an L or P image whose values are class
    ids, checked to be 0..15 or the Background index 255.

    A mode-1 mask holds ids 0 and 1: Pillow keeps a set pixel as 255, but as an array (as
    ``datasets`` users see it) it is 1. A 16- or 32-bit mask is narrowed once its extrema
    show every value fits. Extrema and histogram count values without copying a (possibly
    200 MP) mask.
    """
    mask = decode(mask, where)
    if mask.mode == "1":
        mask = mask.convert("L").point(lambda value: value // 255)
    elif mask.mode in ("I;16", "I"):
        low, high = mask.getextrema()
        if low < 0 or high > 255:
            raise UserError(
                f"{where}: the annotation holds values from {low} to {high}, outside 0..15 and 255"
                " (Background); fix the mask: values are class ids, not colours."
            )
        mask = mask.convert("L")
    bad = [value for value, count in enumerate(mask.histogram()[:256]) if count and value not in VALID_MASK_VALUES]
    if bad:
        raise UserError(
            f"{where}: the annotation holds values {bad[:10]} outside 0..15 and 255 (Background);"
            " fix the mask: values are class ids, not colours."
        )
    return mask
