"""A seeded procedural stand-in for ARTeFACT, for tests and smoke runs without the download.

Each image is a textured "artwork" (material-dependent base colour, low-frequency shading and
content-dependent structure) framed by a flat Background border, with 2..5 damage types drawn
on it using the real class ids. Damage shapes loosely resemble the real thing, but colours and
textures are deliberately distinctive per class so a tiny network learns them within a few
epochs: the point is an end-to-end check that a sweep can learn, not realism. How often each
class is drawn, and how large, follows ARTeFACT's class frequencies (``synthetic_damage.DAMAGE_ODDS``), so a
default run meets the real imbalance: about 87% Clean, Burn marks a few pixels in one image.

Every image has its own generator seeded by ``(seed, index)``, so a data set is byte-identical
for a seed and image ``i`` does not depend on ``count``. Only numpy and Pillow are used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artefact.data.sources.folder import FolderWriter
from artefact.data.sources.parquet import ParquetWriter
from artefact.data.sources.synthetic_damage import DAMAGE, choose_damage, curve, smooth_noise
from artefact.errors import UserError
from artefact.taxonomy import IGNORE_INDEX

MATERIALS: tuple[str, ...] = (
    "Paper",
    "Parchment",
    "Glass",
    "Tesserae",
    "Wood",
    "Canvas",
    "Lime plaster",
    "Film emulsion",
    "Textile",
    "Ceramic",
)
"""The ARTeFACT material values; the split is stratified by these."""

CONTENTS: tuple[str, ...] = ("Artistic depiction", "Photographic depiction", "Geometric patterns", "Line art")
"""The ARTeFACT content values."""

LAYOUTS: tuple[str, ...] = ("folder", "parquet")
MIN_SIDE = 32
"""Below this the border and damage shapes no longer fit."""

_BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "Paper": (222, 212, 186),
    "Parchment": (212, 186, 142),
    "Glass": (118, 160, 172),
    "Tesserae": (158, 128, 96),
    "Wood": (142, 98, 58),
    "Canvas": (190, 174, 142),
    "Lime plaster": (208, 198, 176),
    "Film emulsion": (112, 108, 100),
    "Textile": (150, 92, 96),
    "Ceramic": (214, 212, 200),
}

DEFAULT_COUNT = 48
"""Images in the built-in synthetic set: enough for a split with every class on both sides."""


def generate(
    out: Path,
    *,
    count: int = DEFAULT_COUNT,
    size: tuple[int, int] = (128, 160),
    layout: str = "folder",
    seed: int = 0,
) -> Path:
    """Write ``count`` synthetic samples to ``out`` in the folder or parquet layout and return ``out``.

    ``size`` is the (min, max) side in pixels; height and width are drawn independently, so
    aspect ratios vary. Materials cycle so each appears ``count // 10`` times or more, which
    keeps a material-stratified split possible for ``count >= 30``.
    """
    if layout not in LAYOUTS:
        raise UserError(f"synthetic layout {layout!r} is not one of {', '.join(LAYOUTS)}.")
    low, high = size
    if not MIN_SIDE <= low <= high:
        raise UserError(f"synthetic size {size} must be (min, max) sides with {MIN_SIDE} <= min <= max.")
    if count < 1 or seed < 0:
        raise UserError(f"synthetic count ({count}) must be positive and seed ({seed}) non-negative.")
    writer = FolderWriter(out) if layout == "folder" else ParquetWriter(out)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = (int(side) for side in rng.integers(low, high + 1, size=2))
        material = MATERIALS[index % len(MATERIALS)]
        # Offsetting by the cycle number gives every material every content over 40 images.
        content = CONTENTS[(index + index // len(MATERIALS)) % len(CONTENTS)]
        image, mask = render(rng, height, width, material, content)
        writer.add(f"synth_{index:04d}", Image.fromarray(image), Image.fromarray(mask), material, content)
    writer.close()
    return out


def render(
    rng: np.random.Generator, height: int, width: int, material: str, content: str
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: an HxWx3 uint8 image and its HxW uint8 index mask (0..15, 255 = Background)."""
    if material not in _BASE_COLOURS or content not in _CONTENT_LAYERS:
        raise UserError(f"unknown synthetic material/content {material!r}/{content!r}.")
    if min(height, width) < MIN_SIDE:
        raise UserError(f"synthetic images need sides of at least {MIN_SIDE} px, not {height}x{width}.")
    top, bottom = (_border(rng, height) for _ in range(2))
    left, right = (_border(rng, width) for _ in range(2))
    art_h, art_w = height - top - bottom, width - left - right

    art = _artwork(rng, art_h, art_w, material, content)
    labels = np.zeros((art_h, art_w), dtype=np.uint8)
    chosen = choose_damage(rng)
    # DAMAGE's order paints large soft damage first, so thin damage drawn later stays visible.
    for class_id in (c for c in DAMAGE if c in chosen):
        labels[DAMAGE[class_id](rng, art)] = class_id

    backdrop = rng.integers(15, 240) + rng.integers(-12, 13, size=3)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = np.clip(backdrop, 0, 255)
    image[top : top + art_h, left : left + art_w] = np.clip(np.rint(art), 0, 255)
    mask = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    mask[top : top + art_h, left : left + art_w] = labels
    return image, mask


def _border(rng: np.random.Generator, side: int) -> int:
    """Background on about half the sides, up to 12% of the side, as in photographed artworks."""
    return int(rng.integers(1, int(0.12 * side) + 1)) if rng.random() < 0.5 else 0


# ---------------------------------------------------------------------------- the artwork


def _artwork(rng: np.random.Generator, h: int, w: int, material: str, content: str) -> np.ndarray:
    """Content structure in a material-tinted palette, times material texture and soft shading."""
    base = np.array(_BASE_COLOURS[material], dtype=np.float32)
    # Mid-tone palettes keep near-white, near-black and saturated colours free for damage.
    palette = [base * 0.5 + rng.uniform(45, 205, 3).astype(np.float32) * 0.5 for _ in range(4)]
    layer = _CONTENT_LAYERS[content](rng, h, w, base, palette)
    shade = 0.9 + 0.2 * smooth_noise(rng, h, w, 3)
    return layer * (_texture(rng, h, w, material) * shade)[..., None]


def _texture(rng: np.random.Generator, h: int, w: int, material: str) -> np.ndarray:
    """A multiplicative surface texture around 1: weave, grain, tiles or plain speckle."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grain = 1.0 + 0.05 * (rng.random((h, w), dtype=np.float32) - 0.5)
    if material in ("Canvas", "Textile"):
        period = rng.uniform(2.5, 4.0)
        return grain + 0.06 * np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    if material == "Wood":
        along = yy if rng.random() < 0.5 else xx
        warp = 12.0 * smooth_noise(rng, h, w, 4)
        return grain + 0.08 * np.sin(2 * np.pi * (along + warp) / rng.uniform(5, 9))
    if material == "Tesserae":
        tile = int(rng.integers(6, 11))
        ty, tx = (yy // tile).astype(int), (xx // tile).astype(int)
        jitter = 1.0 + 0.12 * rng.standard_normal((h // tile + 1, w // tile + 1)).astype(np.float32)
        grout = ((yy % tile) < 1) | ((xx % tile) < 1)
        return np.where(grout, 0.85, grain * jitter[ty, tx])
    return grain


def _geometric(rng: np.random.Generator, h: int, w: int, base: np.ndarray, palette: list[np.ndarray]) -> np.ndarray:
    """Checker tiles or angled stripes in two or three palette colours."""
    yy, xx = np.mgrid[0:h, 0:w]
    period = int(rng.integers(8, 24))
    colours = np.stack(palette[: int(rng.integers(2, 4))])
    if rng.random() < 0.5:
        index = (yy // period + xx // period) % len(colours)
    else:
        angle = rng.uniform(0, np.pi)
        index = ((xx * np.cos(angle) + yy * np.sin(angle)) // period).astype(int) % len(colours)
    return colours[index]


def _line_art(rng: np.random.Generator, h: int, w: int, base: np.ndarray, palette: list[np.ndarray]) -> np.ndarray:
    """A plain ground with a few thin sepia curves: dark lines that are content, not damage."""
    ground = Image.new("RGB", (w, h), tuple(int(v) for v in np.clip(base * 1.05, 0, 235)))
    draw = ImageDraw.Draw(ground)
    ink = tuple(int(v) for v in rng.integers(50, 80, 3))
    for _ in range(int(rng.integers(3, 9))):
        draw.line(curve(rng, h, w), fill=ink, width=1)
    return np.asarray(ground, dtype=np.float32)


def _photographic(rng: np.random.Generator, h: int, w: int, base: np.ndarray, palette: list[np.ndarray]) -> np.ndarray:
    """A smooth tonal gradient with soft variation, like a faded monochrome photograph."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    tone = 0.55 * ramp + 0.45 * smooth_noise(rng, h, w, int(rng.integers(3, 6)))
    dark, light = base * 0.35 + 20, np.minimum(base * 0.6 + 80, 215)
    return dark + tone[..., None] * (light - dark)


def _artistic(rng: np.random.Generator, h: int, w: int, base: np.ndarray, palette: list[np.ndarray]) -> np.ndarray:
    """Soft overlapping colour blobs, like a blurred painted scene."""
    canvas = Image.new("RGB", (w, h), tuple(int(v) for v in palette[0]))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 11))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.1, 0.35) * w, rng.uniform(0.1, 0.35) * h
        colour = palette[int(rng.integers(1, len(palette)))]
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(int(v) for v in colour))
    blurred = canvas.filter(ImageFilter.GaussianBlur(min(h, w) / 12))
    return np.asarray(blurred, dtype=np.float32)


_CONTENT_LAYERS: dict[str, Callable[[np.random.Generator, int, int, np.ndarray, list[np.ndarray]], np.ndarray]] = {
    "Artistic depiction": _artistic,
    "Photographic depiction": _photographic,
    "Geometric patterns": _geometric,
    "Line art": _line_art,
}
