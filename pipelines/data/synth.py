"""The synthetic images of ``synth_corpus``: a taxonomy of visual classes and the rendering of one image.

A superclass is a (shape, background) pair and a class inside it a (hue, texture) pair, so a classifier has to learn
both levels. Everything random comes from the generator the caller passes, so an image depends on nothing else.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from pipelines.data.glyphs import GlyphClass

# The visual vocabulary. A superclass is a (shape, background) pair, so every class in it shares both traits;
# a class inside it is a (hue, texture) pair. No shape is a rotation of another (hence no diamond beside the square).
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "crescent", "bars", "chevron", "ellipse")
BACKGROUNDS = ("plain", "speckled", "gradient", "grid")
HUES = ("red", "orange", "yellow", "lime", "green", "jade", "cyan", "azure", "blue", "violet", "purple", "magenta")
TEXTURES = ("solid", "striped", "dotted", "hollow", "checked", "twotone")
MAX_SUPERCLASSES = len(SHAPES) * len(BACKGROUNDS)  # 40
MAX_CLASSES_PER_SUPERCLASS = len(HUES) * len(TEXTURES)  # 72
MAX_CLASSES = MAX_SUPERCLASSES * MAX_CLASSES_PER_SUPERCLASS  # 2,880
_SUPERSAMPLE = 2  # shape masks are drawn at 2x and box-filtered, for anti-aliased edges


@dataclass(frozen=True)
class SynthClass:
    id: int
    name: str  # "speckled-star/red-striped": superclass/class, readable in confusion matrices
    superclass: int  # index among the superclasses (its label id is num_classes + superclass)
    shape: str
    background: str
    hue: str
    texture: str


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[SynthClass, ...] | tuple[GlyphClass, ...]
    superclasses: tuple[str, ...]

    def vocabulary(self) -> list[dict[str, Any]]:
        """The ``classes.json`` entries: leaf classes, then superclasses."""
        leaves = [{"id": c.id, "name": c.name, "superclass": self.superclasses[c.superclass]} for c in self.classes]
        k = len(self.classes)
        return leaves + [{"id": k + s, "name": name, "superclass": None} for s, name in enumerate(self.superclasses)]


def synth_taxonomy(classes: int, superclasses: int | None = None) -> Taxonomy:
    """Name ``classes`` leaf classes and group them into superclasses (about sqrt(classes) by default)."""
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES} (distinct visual classes), got {classes}")
    fewest = math.ceil(classes / MAX_CLASSES_PER_SUPERCLASS)
    if superclasses is None:
        superclasses = min(MAX_SUPERCLASSES, max(fewest, round(math.sqrt(classes))))
    elif not max(1, fewest) <= superclasses <= min(MAX_SUPERCLASSES, classes):
        raise ValueError(
            f"superclasses must be between {max(1, fewest)} and {min(MAX_SUPERCLASSES, classes)} for {classes} "
            f"classes (each holds at most {MAX_CLASSES_PER_SUPERCLASS}), got {superclasses}"
        )
    # Superclass s gets shape s mod 10 and a background that also varies among the first ten; (shape, background)
    # stays unique up to 40 because s and s + 10k differ by 11k (not a multiple of 4) in the background index.
    shapes = [SHAPES[s % len(SHAPES)] for s in range(superclasses)]
    backgrounds = [BACKGROUNDS[(s + s // len(SHAPES)) % len(BACKGROUNDS)] for s in range(superclasses)]
    names = tuple(f"{background}-{shape}" for background, shape in zip(backgrounds, shapes))
    leaves = []
    for s in range(superclasses):
        first, stop = s * classes // superclasses, (s + 1) * classes // superclasses
        for j in range(stop - first):
            # Step 5 is coprime to 12, so consecutive classes sit 150 degrees apart on the hue circle. A hue comes back
            # every 12 classes, by when the texture index has moved on by 13 (1 mod 6): no (hue, texture) repeats
            # among the 72 classes a superclass can hold.
            hue = HUES[(5 * j + 3 * s) % len(HUES)]
            texture = TEXTURES[(j + j // len(HUES) + s) % len(TEXTURES)]
            leaves.append(
                SynthClass(
                    id=first + j,
                    name=f"{names[s]}/{hue}-{texture}",
                    superclass=s,
                    shape=shapes[s],
                    background=backgrounds[s],
                    hue=hue,
                    texture=texture,
                )
            )
    return Taxonomy(classes=tuple(leaves), superclasses=names)


# --------------------------------------------------------------------------------------------------------------------
# Labels and pixels of one image. Everything random comes from the image's own generator, seeded by (seed, index):
# an image depends on nothing else, so chunking and the worker count cannot change a byte.


def plan_labels(
    rng: np.random.Generator, num_classes: int, labels_per_image: tuple[int, int], label_noise: float
) -> tuple[list[int], list[int]]:
    """Draw the classes shown in an image (primary first) and its noisy leaf labels (sorted ids)."""
    count = int(rng.integers(labels_per_image[0], labels_per_image[1] + 1))
    shown = [int(c) for c in rng.choice(num_classes, size=count, replace=False)]
    labels = list(shown)
    if rng.random() < label_noise and count < num_classes:
        # One annotation goes wrong: it names a class that is not in the picture.
        absent = np.setdiff1d(np.arange(num_classes), shown)
        labels[int(rng.integers(count))] = int(absent[rng.integers(len(absent))])
    return shown, sorted(labels)


def render_image(rng: np.random.Generator, shown: Sequence[int], taxonomy: Taxonomy, size: int) -> Image.Image:
    """An RGB image: the primary class's shape large, the others' small, on its superclass's background."""
    primary = taxonomy.classes[shown[0]]
    canvas = _background(rng, primary.background, size)
    for rank, class_id in enumerate(shown):
        cls = taxonomy.classes[class_id]
        radius = size * (rng.uniform(0.24, 0.36) if rank == 0 else rng.uniform(0.10, 0.16))
        margin = radius * (0.8 if rank == 0 else 1.0)  # the primary may be cropped a little, like a real photo
        cx, cy = rng.uniform(margin, size - margin, size=2)
        theta = rng.uniform(0.0, 2 * math.pi)
        mask = _shape_mask(cls.shape, size, cx, cy, radius, theta, hollow=cls.texture == "hollow")
        fill = _texture(rng, cls, size, cx, cy)
        canvas += mask[..., None] * (fill - canvas)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(4.0, 12.0)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.meshgrid(np.arange(size, dtype=np.float32) + 0.5, np.arange(size, dtype=np.float32) + 0.5)
    return x, y


def _background(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    # A random, low-saturation base colour per image, so that only the style (a superclass trait) carries signal.
    base = rng.uniform(50, 205) + rng.uniform(-25, 25, size=3)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = base
    x, y = _grid(size)
    if style == "gradient":
        phi = rng.uniform(0, 2 * math.pi)
        ramp = ((x - size / 2) * math.cos(phi) + (y - size / 2) * math.sin(phi)) / size
        canvas += ramp[..., None] * rng.uniform(80, 140)
    elif style == "speckled":
        cell = max(1, size // 64)  # specks keep their share of the image at any resolution
        cells = -(-size // cell)
        specks = (rng.random((cells, cells)) < 0.07) * rng.uniform(-90, 90, size=(cells, cells))
        canvas += np.kron(specks, np.ones((cell, cell)))[:size, :size, None].astype(np.float32)
    elif style == "grid":
        period, width = size / rng.uniform(4.5, 7.0), max(1.0, size / 48)
        dx, dy = rng.uniform(0, period, size=2)
        lines = ((x + dx) % period < width) | ((y + dy) % period < width)
        canvas[lines] += rng.choice([-1.0, 1.0]) * rng.uniform(45, 70)
    return canvas


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float, hollow: bool) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (cx, cy) with radius r, turned by theta."""
    ss = _SUPERSAMPLE
    image = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(image)
    _draw_shape(draw, shape, cx * ss, cy * ss, r * ss, theta, fill=255)
    if hollow:
        _draw_shape(draw, shape, cx * ss, cy * ss, r * ss * 0.72, theta, fill=0)  # thinner than a ring (0.52)
    return np.asarray(image.reduce(ss), dtype=np.float32) * (1 / 255)


def _ring_of_points(radii: Sequence[float], start: float = math.pi / 2) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle (a regular polygon, or a star with alternating radii)."""
    step = 2 * math.pi / len(radii)
    return [(r * math.cos(start + k * step), r * math.sin(start + k * step)) for k, r in enumerate(radii)]


# Polygon outlines in units of the shape's radius, centred on the origin, before rotation; scaled so that the shapes
# cover similar areas. Circles, rings, crescents and bars are drawn in _draw_shape.
_ARM = 0.33  # half-width of the cross's arms
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": _ring_of_points([1.15] * 3),
    "star": _ring_of_points([1.15, 0.48] * 5),
    "ellipse": [(1.25 * x, 0.6 * y) for x, y in _ring_of_points([1.0] * 32)],
    "cross": [
        (_ARM, 1),
        (_ARM, _ARM),
        (1, _ARM),
        (1, -_ARM),
        (_ARM, -_ARM),
        (_ARM, -1),
        (-_ARM, -1),
        (-_ARM, -_ARM),
        (-1, -_ARM),
        (-1, _ARM),
        (-_ARM, _ARM),
        (-_ARM, 1),
    ],
    "chevron": [(-1, 0.3), (0, -0.7), (1, 0.3), (1, 0.8), (0, -0.2), (-1, 0.8)],
}
_BARS = [[(-1, y - 0.2), (1, y - 0.2), (1, y + 0.2), (-1, y + 0.2)] for y in (-0.66, 0.0, 0.66)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, theta: float, fill: int) -> None:
    cos, sin = math.cos(theta), math.sin(theta)

    def place(u: float, v: float) -> tuple[float, float]:
        return cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)

    def disc(u: float, v: float, radius: float, value: int) -> None:
        x, y = place(u, v)
        draw.ellipse((x - r * radius, y - r * radius, x + r * radius, y + r * radius), fill=value)

    if shape == "circle":
        disc(0, 0, 1.0, fill)
    elif shape == "ring":
        disc(0, 0, 1.05, fill)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        disc(0, 0, 1.05, fill)
        disc(0.45, 0, 0.85, 0)
    elif shape == "bars":
        for bar in _BARS:
            draw.polygon([place(u, v) for u, v in bar], fill=fill)
    elif shape in _OUTLINES:
        draw.polygon([place(u, v) for u, v in _OUTLINES[shape]], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _texture(rng: np.random.Generator, cls: SynthClass, size: int, cx: float, cy: float) -> np.ndarray:
    """The colour field a shape is cut from: the class hue (jittered) in the class's pattern."""
    hue = (HUES.index(cls.hue) * 30 + rng.uniform(-8, 8)) % 360
    fg = np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)), np.float32) * 255
    if cls.texture in ("solid", "hollow"):
        return np.broadcast_to(fg, (size, size, 3))
    x, y = _grid(size)
    phi = rng.uniform(0, math.pi)
    u = (x - cx) * math.cos(phi) + (y - cy) * math.sin(phi)
    v = (y - cy) * math.cos(phi) - (x - cx) * math.sin(phi)
    period = size / 9 * rng.uniform(0.85, 1.15)
    dark, light = fg * 0.3, fg * 0.4 + 255 * 0.6
    if cls.texture == "striped":
        on, other = (u / period) % 1 < 0.5, dark
    elif cls.texture == "dotted":
        on, other = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (0.3 * period) ** 2, dark
    elif cls.texture == "checked":
        on, other = (np.floor(u / period) + np.floor(v / period)) % 2 == 0, light
    elif cls.texture == "twotone":
        on, other = u < 0, light
    else:
        raise ValueError(f"unknown texture {cls.texture!r}")
    return np.where(on[..., None], other, fg)
