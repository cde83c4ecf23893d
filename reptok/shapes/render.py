"""``builtin:shapes``: the embedded, procedurally generated dataset that lets the whole pipeline run
offline on a CPU.

12 classes = 4 shapes x 3 colours, class id ``shape_idx * 3 + colour_idx``, names like
``"red circle"``. Each image has a random position, size and rotation on a varied background
(plain muted colour, two-tone gradient or noise texture; backgrounds are desaturated so they are
never close to the saturated foreground colours). The class is one fact a semantic token carries
easily; position, size, angle and background are spatial detail it does not, which is what a
reconstruction-trained token must learn to add.

Image ``i`` depends only on ``(seed, i)`` (its own RNG stream), so ``make_shapes(n)[:k]`` equals
``make_shapes(k)`` and a ``--limit`` picks a prefix of the full dataset.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generator's output changes: the judge cache key includes it.
SHAPES_VERSION = 3

SHAPES: Tuple[str, ...] = ("circle", "ring", "bar", "cross")
COLOURS: Tuple[str, ...] = ("red", "green", "blue")
NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES: List[str] = [f"{c} {s}" for s in SHAPES for c in COLOURS]

# Saturated foreground colours (jittered per image by up to +-25 per channel).
_FG = {"red": (220, 40, 40), "green": (40, 185, 50), "blue": (40, 70, 225)}
# Muted background palette: low saturation, so a background is never mistaken for a foreground.
_BG = {
    "grey": (128, 128, 128),
    "dark grey": (62, 62, 62),
    "light grey": (196, 196, 196),
    "white": (236, 236, 232),
    "black": (24, 24, 26),
    "beige": (204, 192, 164),
    "brown": (112, 94, 78),
    "slate": (104, 112, 128),
    "olive": (118, 118, 86),
    "lavender": (184, 176, 200),
}
_BG_NAMES = tuple(_BG)
SIZES = ("small", "medium", "large")
# Circumradius as a fraction of the image side, one band per size word.
# v3: larger than v2 (0.20-0.40) so that a blurry 16 px sample still shows bar vs cross.
_SIZE_BANDS = ((0.26, 0.32), (0.32, 0.38), (0.38, 0.45))
POSITIONS = (
    ("top left", "at the top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "at the bottom", "bottom right"),
)
_POS_PHRASE = {
    "top left": "in the top left", "at the top": "at the top", "top right": "in the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "in the bottom left", "at the bottom": "at the bottom", "bottom right": "in the bottom right",
}
_RING_HOLE = 0.5  # hole radius relative to the outer radius
_SUPERSAMPLE = 4  # draw the mask at 4x and box-filter down: cheap antialiasing


def class_of(shape: str, colour: str) -> int:
    """Class id of a (shape, colour) pair, e.g. ``class_of("circle", "red") == 0``."""
    try:
        return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)
    except ValueError:
        raise ValueError(f"unknown shape/colour {shape!r}/{colour!r}; shapes {SHAPES}, colours {COLOURS}") from None


def parse_class(class_id: int) -> Tuple[str, str]:
    """Class id -> (shape, colour)."""
    class_id = int(class_id)
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id {class_id} outside 0..{NUM_CLASSES - 1}")
    return SHAPES[class_id // len(COLOURS)], COLOURS[class_id % len(COLOURS)]


def caption_class(text: str) -> Optional[int]:
    """The class a caption or prompt names ("a red circle on ..." -> 0), or None if it names no
    single shape and colour (used to score text-to-image samples with the judge)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    shapes = [s for s in SHAPES if s in words]
    colours = [c for c in COLOURS if c in words]
    if len(shapes) != 1 or len(colours) != 1:
        return None
    return class_of(shapes[0], colours[0])


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if shape == "bar":
        w = 0.36  # half-width relative to the half-length
        pts = [(1, -w), (1, w), (-1, w), (-1, -w)]
    elif shape == "cross":
        w = 0.30  # arm half-width relative to the circumradius
        arm = math.sqrt(1 - w * w)
        pts = [(w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
               (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm)]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _background(rng: np.random.Generator, res: int) -> Tuple[np.ndarray, str]:
    """float32 (res, res, 3) background in [0, 255] and its caption phrase."""

    def colour() -> Tuple[str, np.ndarray]:
        name = _BG_NAMES[rng.integers(len(_BG_NAMES))]
        base = np.asarray(_BG[name], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
        return name, base

    kind = rng.integers(3)
    name, a = colour()
    if kind == 0:
        return np.broadcast_to(a, (res, res, 3)).astype(np.float32), f"on {_a(name)} background"
    if kind == 1:
        name2, b = colour()
        while name2 == name:
            name2, b = colour()
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / max(res - 1, 1)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a * (1 - t[..., None]) + b * t[..., None]
        return img.astype(np.float32), f"on {_a(name)} and {name2} gradient background"
    # Noise texture: coarse blobs (bicubic-upsampled grid) plus fine grain, grey-level only so
    # the texture adds spatial detail without adding saturation.
    g = int(rng.integers(3, 7))
    coarse = rng.uniform(-28, 28, (g, g)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(coarse, mode="F").resize((res, res), Image.BICUBIC))
    fine = rng.normal(0, 7, (res, res)).astype(np.float32)
    img = a + (coarse + fine)[..., None]
    return np.clip(img, 0, 255).astype(np.float32), f"on a textured {name} background"


def render_shape(
    rng: np.random.Generator,
    label: int,
    resolution: int = 32,
    bg_rng: Optional[np.random.Generator] = None,
    fg_rng: Optional[np.random.Generator] = None,
) -> Tuple[np.ndarray, str, Dict[str, object]]:
    """One image of class ``label``: uint8 (R, R, 3), its caption, and its attributes.

    ``bg_rng`` / ``fg_rng`` draw the background / the foreground colour from separate streams,
    so that two calls can share the object's colour and differ in geometry or background (the
    SSL encoder's views)."""
    shape, colour = parse_class(label)
    res = int(resolution)
    bg, bg_phrase = _background(rng if bg_rng is None else bg_rng, res)
    size_idx = int(rng.integers(3))
    lo, hi = _SIZE_BANDS[size_idx]
    r = rng.uniform(lo, hi) * res
    # Keep the whole shape inside the frame (circumradius from the centre).
    cx, cy = rng.uniform(r, res - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    jitter = (rng if fg_rng is None else fg_rng).uniform(-25, 25, 3)
    fg = np.clip(np.asarray(_FG[colour], np.float32) + jitter, 0, 255).astype(np.float32)

    s = _SUPERSAMPLE
    mask = Image.new("L", (res * s, res * s), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
        if shape == "ring":
            h = r * _RING_HOLE
            draw.ellipse([(cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s], fill=0)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r, angle)], fill=255)
    alpha = np.asarray(mask.resize((res, res), Image.BOX), np.float32)[..., None] / 255.0
    img = bg * (1 - alpha) + fg * alpha

    row = min(int(cy * 3 // res), 2)
    col = min(int(cx * 3 // res), 2)
    pos = POSITIONS[row][col]
    caption = f"a {SIZES[size_idx]} {colour} {shape} {_POS_PHRASE[pos]} {bg_phrase}"
    attrs = {"shape": shape, "colour": colour, "size": SIZES[size_idx], "position": pos,
             "cx": float(cx), "cy": float(cy), "radius": float(r), "angle": float(angle)}
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), caption, attrs


def iter_shapes(
    n: int, resolution: int = 32, seed: int = 0, start: int = 0
) -> Iterator[Tuple[np.ndarray, int, str]]:
    """Yield ``(image uint8 (R,R,3), label, caption)`` for images ``start .. start+n-1``.

    Labels cycle through the classes (``i % 12``) so any prefix is class-balanced; everything
    else about image ``i`` comes from its own RNG stream seeded by ``(seed, i)``.
    """
    for i in range(start, start + n):
        rng = np.random.default_rng([int(seed), i])
        label = i % NUM_CLASSES
        img, caption, _ = render_shape(rng, label, resolution)
        yield img, label, caption


def make_shapes(n: int, resolution: int = 32, seed: int = 0) -> Dict[str, object]:
    """Generate ``n`` images in memory.

    Returns ``dict(images=uint8 (n,R,R,3), labels=int64 (n,), captions=list[str],
    class_names=list[str])``.
    """
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    labels = np.empty((n,), np.int64)
    captions: List[str] = []
    for i, (img, label, cap) in enumerate(iter_shapes(n, resolution, seed)):
        images[i] = img
        labels[i] = label
        captions.append(cap)
    return {"images": images, "labels": labels, "captions": captions, "class_names": list(CLASS_NAMES)}
