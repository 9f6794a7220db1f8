"""The damage drawn on synthetic artworks: one drawer per ARTeFACT damage class, how often
each is drawn (``DAMAGE_ODDS``), and the drawing helpers they share with the artwork."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Rgb = tuple[float, float, float]
Damage = Callable[[np.random.Generator, np.ndarray], np.ndarray]


def choose_damage(rng: np.random.Generator) -> set[int]:
    """Each class with its ``DAMAGE_ODDS``, drawn again until an image shows 2 to 5 of them."""
    ids, odds = np.array(list(DAMAGE_ODDS)), np.array(list(DAMAGE_ODDS.values()))
    while True:
        chosen = ids[rng.random(len(ids)) < odds]
        if 2 <= len(chosen) <= 5:
            return {int(c) for c in chosen}


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a tiny random grid upsampled bicubically."""
    grid = rng.random((cells, cells), dtype=np.float32)
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(smooth, 0.0, 1.0)


# ---------------------------------------------------------------------------- drawing helpers


def _stencil(h: int, w: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A blank one-channel layer to draw a damage shape on; nonzero pixels are the shape."""
    layer = Image.new("L", (w, h), 0)
    return layer, ImageDraw.Draw(layer)


def _on(layer: Image.Image) -> np.ndarray:
    """The drawn pixels of a stencil, as a boolean mask."""
    return np.asarray(layer) > 0


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float = 0.3) -> list[float]:
    """An irregular closed outline: a circle whose radius wobbles with a few random harmonics."""
    points = 24
    theta = np.linspace(0, 2 * np.pi, points, endpoint=False)
    wobble = sum(
        rng.uniform(0, roughness / k) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    ) + rng.uniform(-roughness / 4, roughness / 4, points)
    r = radius * np.maximum(1 + wobble, 0.2)
    return np.column_stack([cx + r * np.cos(theta), cy + r * np.sin(theta)]).ravel().tolist()


def curve(rng: np.random.Generator, h: float, w: float, x0: float = 0.0, y0: float = 0.0) -> list[float]:
    """A smooth quadratic Bezier between two random points of a box (from x0, y0), as a polyline."""
    p0, p1, p2 = (np.array([x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)]) for _ in range(3))
    t = np.linspace(0, 1, 40)[:, None]
    return ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).ravel().tolist()


def _paint(art: np.ndarray, where: np.ndarray, colour: Rgb | np.ndarray, alpha: float | np.ndarray = 1.0) -> None:
    """Blend a colour over ``art`` on ``where`` only, so labelled pixels are exactly the changed ones."""
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float32), where.shape)[where][:, None]
    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 3:
        colour = colour[where]
    art[where] = art[where] * (1 - alpha) + colour * alpha


def _centre(rng: np.random.Generator, h: int, w: int) -> tuple[float, float]:
    """A random (x, y) away from the edges, so shapes mostly land inside the artwork."""
    return rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h


# ---------------------------------------------------------------------------- damage classes
# Each takes the artwork (float HxWx3, modified in place) and returns the boolean pixels it drew.


def _lightleak(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """15: a bright yellow-to-orange glow fading in from one edge."""
    h, w = art.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = int(rng.integers(4))
    distance, span = [(yy, h), (h - 1 - yy, h), (xx, w), (w - 1 - xx, w)][edge]
    along = smooth_noise(rng, h, w, 3)
    depth = span * rng.uniform(0.05, 0.1) * (0.5 + along)
    strength = np.clip(1 - distance / depth, 0, 1) ** 0.8
    drawn = strength > 0.2
    colour = np.array([255, 140, 25], np.float32) + strength[..., None] * np.array([0, 90, 70], np.float32)
    _paint(art, drawn, colour, 0.35 + 0.6 * strength)
    return drawn


def _staining(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """10: a large soft yellow-brown blot with a darker tide line, multiplied into the surface."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    radius = rng.uniform(0.1, 0.2) * min(h, w)
    for _ in range(int(rng.integers(1, 4))):
        ox, oy = rng.normal(0, radius / 3, 2)
        draw.polygon(_blob(rng, cx + ox, cy + oy, radius * rng.uniform(0.6, 1.0)), fill=255)
    soft = np.asarray(layer.filter(ImageFilter.GaussianBlur(radius / 5)), dtype=np.float32) / 255
    drawn = soft > 0.3
    tide = (soft > 0.3) & (soft < 0.5)
    tint = art * (np.array([205, 160, 80], np.float32) / 255)
    _paint(art, drawn, tint, np.where(tide, 0.95, 0.7))
    return drawn


def _burn(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """14: a speck of a few pixels, charred near-black in an orange-brown edge (the rarest real class)."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    radius = rng.uniform(1.5, 2.5)
    outline = _blob(rng, cx, cy, radius, roughness=0.45)
    draw.polygon(outline, fill=128)
    draw.polygon((np.array(outline) * 0.75 + np.tile([cx, cy], len(outline) // 2) * 0.25).tolist(), fill=255)
    value = np.asarray(layer)
    char = 25 + 25 * rng.random((h, w), dtype=np.float32)
    _paint(art, value == 128, (205, 105, 30), 0.9)
    _paint(art, value == 255, np.stack([char * 1.3, char, char * 0.8], axis=-1))
    return value > 0


def _dirt(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """6: a cluster of mottled brown blotches."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    spread = rng.uniform(0.1, 0.25) * min(h, w)
    for _ in range(int(rng.integers(2, 6))):
        x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
        draw.polygon(_blob(rng, x, y, rng.uniform(0.025, 0.06) * min(h, w), roughness=0.5), fill=255)
    drawn = _on(layer)
    mottle = 0.6 + 0.35 * rng.random((h, w), dtype=np.float32)
    _paint(art, drawn, (92, 66, 40), mottle)
    return drawn


def _material_loss(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """1: bare ground showing through: irregular near-white patches with faint fibres."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = _centre(rng, h, w)
        draw.polygon(_blob(rng, cx, cy, rng.uniform(0.06, 0.14) * min(h, w), roughness=0.5), fill=255)
    drawn = _on(layer)
    fibre = 238 + 14 * rng.random((h, w), dtype=np.float32)
    _paint(art, drawn, np.stack([fibre, fibre - 3, fibre - 10], axis=-1))
    return drawn


def _peel(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """2: a lifted flake of paint: a lighter, washed-out patch with a dark rim."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = _centre(rng, h, w)
        draw.polygon(_blob(rng, cx, cy, rng.uniform(0.08, 0.16) * min(h, w)), fill=255, outline=128, width=2)
    value = np.asarray(layer)
    inside = value == 255
    art[inside] = art[inside] * 0.45 + 140
    _paint(art, value == 128, (45, 35, 30))
    return value > 0


def _sticker(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """12: a flat, saturated, slightly rotated rectangle (green, blue, magenta or cyan)."""
    h, w = art.shape[:2]
    cx, cy = _centre(rng, h, w)
    half = np.array([rng.uniform(0.05, 0.1) * w, rng.uniform(0.04, 0.08) * h])
    angle = rng.uniform(-0.3, 0.3)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half @ rotation.T + [cx, cy]
    layer, draw = _stencil(h, w)
    draw.polygon(corners.ravel().tolist(), fill=255)
    drawn = _on(layer)
    colours = ((40, 190, 80), (50, 110, 235), (215, 50, 200), (40, 200, 215))
    _paint(art, drawn, colours[int(rng.integers(len(colours)))])
    return drawn


def _fold(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """7: a straight crease across the artwork: a band lit on one side, shadowed on the other."""
    h, w = art.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Folds mostly run parallel to an edge; allow some tilt.
    angle = rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.25, 0.25)
    cx, cy = _centre(rng, h, w)
    across = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    half = rng.uniform(1.0, 2.5)
    drawn = np.abs(across) < half
    light = np.where(np.abs(across) < 0.8, 0.45, 1.0 + 0.45 * across / half)
    art[drawn] = np.minimum(art[drawn] * light[drawn][:, None] + 10, 255)
    return drawn


def _stamp(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """11: a red ink stamp: a double ring or a rectangular frame."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    radius = rng.uniform(0.05, 0.09) * min(h, w)
    thick = int(rng.integers(2, 4))
    if rng.random() < 0.6:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=255, width=thick)
        inner = radius * 0.6
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=255, width=max(thick - 1, 1))
    else:
        draw.rectangle(
            (cx - radius * 1.4, cy - radius * 0.8, cx + radius * 1.4, cy + radius * 0.8), outline=255, width=thick
        )
    drawn = _on(layer)
    _paint(art, drawn, (195, 25, 40), 0.7 + 0.25 * rng.random((h, w), dtype=np.float32))
    return drawn


def _writing(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """8: a block of handwriting: rows of short dark-blue zigzag strokes grouped into words."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    x0, y0 = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.6) * h
    block_w = rng.uniform(0.2, 0.35) * w
    letter, spacing = rng.uniform(3.0, 4.5), rng.uniform(7.0, 10.0)
    slant = rng.uniform(-0.4, 0.4)
    for row in range(int(rng.integers(1, 4))):
        baseline, x = y0 + row * spacing, x0
        while x < x0 + block_w:
            for _ in range(int(rng.integers(2, 7))):
                heights = rng.uniform(2.5, 5.5, 4) * rng.choice([1.0, -0.3], 4, p=[0.8, 0.2])
                xs = x + np.linspace(0, letter, 4) + slant * heights
                draw.line(np.column_stack([xs, baseline - heights]).ravel().tolist(), fill=255, width=1)
                x += letter
            x += letter * 1.5
    drawn = _on(layer)
    _paint(art, drawn, (28, 38, 120), 0.9)
    return drawn


def _cracks(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """9: a branching network of jagged dark hairline cracks (random walks that fork)."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    walkers = [(cx, cy, rng.uniform(0, 2 * np.pi), int(rng.integers(15, 30)))]
    for _ in range(int(rng.integers(1, 3))):
        walkers.append((cx, cy, rng.uniform(0, 2 * np.pi), int(rng.integers(10, 25))))
    while walkers:
        x, y, heading, steps = walkers.pop()
        path = [x, y]
        for _ in range(steps):
            heading += rng.uniform(-0.6, 0.6)
            x, y = x + 4 * np.cos(heading), y + 4 * np.sin(heading)
            path += [x, y]
            if rng.random() < 0.12 and len(walkers) < 12:
                walkers.append((x, y, heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.3), steps // 2))
        draw.line(path, fill=255, width=1)
    drawn = _on(layer)
    _paint(art, drawn, (38, 28, 22), 0.95)
    return drawn


def _scratch(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """4: a few long, nearly parallel straight light lines."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    heading = rng.uniform(0, np.pi)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = _centre(rng, h, w)
        length = rng.uniform(0.3, 0.8) * max(h, w) / 2
        angle = heading + rng.uniform(-0.15, 0.15)
        dx, dy = length * np.cos(angle), length * np.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=1)
    drawn = _on(layer)
    _paint(art, drawn, (236, 236, 228), 0.9)
    return drawn


def _hair(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """5: a short, thin, near-black smooth curve."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    cx, cy = _centre(rng, h, w)
    span = rng.uniform(8, 16)
    draw.line(curve(rng, 2 * span, 2 * span, cx - span, cy - span), fill=255, width=1, joint="curve")
    drawn = _on(layer)
    _paint(art, drawn, (14, 12, 10))
    return drawn


def _puncture(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """13: a few small black holes through the support."""
    h, w = art.shape[:2]
    layer, draw = _stencil(h, w)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = _centre(rng, h, w)
        draw.polygon(_blob(rng, cx, cy, rng.uniform(1.5, 3.0), roughness=0.3), fill=255)
    drawn = _on(layer)
    _paint(art, drawn, (6, 6, 6))
    return drawn


def _dust(rng: np.random.Generator, art: np.ndarray) -> np.ndarray:
    """3: many tiny bright specks of one or two pixels, over part of the artwork."""
    h, w = art.shape[:2]
    cx, cy = _centre(rng, h, w)
    spread = rng.uniform(0.2, 0.4) * np.array([w, h])
    count = int(rng.uniform(0.0015, 0.003) * h * w)
    ys, xs = (
        np.clip(rng.normal(c, s, count), 0, n - 1).astype(int)
        for c, s, n in zip((cy, cx), spread[::-1], (h, w), strict=False)
    )
    drawn = np.zeros((h, w), dtype=bool)
    drawn[ys, xs] = True
    big = rng.random(count) < 0.3
    drawn[np.minimum(ys[big] + 1, h - 1), xs[big]] = True
    drawn[ys[big], np.minimum(xs[big] + 1, w - 1)] = True
    _paint(art, drawn, np.full((h, w, 3), 225 + 30 * rng.random((h, w, 1), dtype=np.float32)))
    return drawn


DAMAGE: dict[int, Damage] = {
    15: _lightleak,
    10: _staining,
    14: _burn,
    6: _dirt,
    1: _material_loss,
    2: _peel,
    12: _sticker,
    7: _fold,
    11: _stamp,
    8: _writing,
    9: _cracks,
    4: _scratch,
    5: _hair,
    13: _puncture,
    3: _dust,
}
"""Class id -> drawer, in painting order: large soft damage first, thin and tiny damage last."""

DAMAGE_ODDS: dict[int, float] = {
    1: 0.83,
    2: 0.83,
    7: 0.29,
    9: 0.29,
    10: 0.21,
    4: 0.21,
    6: 0.17,
    15: 0.125,
    12: 0.083,
    8: 0.083,
    3: 0.083,
    13: 0.083,
    5: 0.083,
    11: 0.0625,
    14: 0.0625,
}
"""Class id -> chance that an image shows it. With the drawers' sizes, each class's share of
the default 48-image set's labelled pixels is within 2.5x of its real share (FACTS.md; a
test holds it within 5x). The rarest classes appear in one to four images of a set, so
another seed's set may lack one or overshoot it."""
