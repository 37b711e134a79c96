"""Synthetic handwriting for ``synth_corpus(style="glyphs")``: an alphabet of stroke glyphs, and one scanned glyph.

The shapes style (``pipelines.data.synth``) teaches colour, texture and outline, none of which a handwritten digit
has: at demo scale its features transfer to the digits no better than random ones. Glyphs are what digits are made
of, pen strokes. A glyph class is a few quadratic Bezier strokes; a superclass (a family) is the stroke its glyphs
share, so a classifier has to learn both levels, as with the shapes. Every image is one glyph written by a new
hand (the strokes' control points, the pen's width, a rotation, shear, scale and shift all vary) and optionally
"scanned" the way the bundled digits were: box-averaged to ``scan_size`` pixels and quantised to 17 ink levels, then
shown at the image size with square pixels. Everything random comes from the generator the caller passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.synth import Taxonomy

MAX_GLYPH_CLASSES = 100_000  # far more than a corpus of a few thousand images per class would use
INK_LEVELS = 17  # the bundled digits' 0..16 ink counts
_ALPHABET_SEED = 20210503  # the glyphs are the same in every corpus: a seed picks images, not the alphabet
_SUPERSAMPLE = 4  # strokes are drawn at 4x and box-filtered, for anti-aliased edges
_STROKE_POINTS = 16  # points along a Bezier stroke: smooth at any size used here
_CONTROL_BOX = (0.12, 0.88)  # control points stay inside the glyph's box, with room for the pen


@dataclass(frozen=True)
class GlyphClass:
    id: int
    name: str  # "family-03/glyph-0042": superclass/class
    superclass: int
    strokes: tuple[tuple[tuple[float, float], ...], ...]  # each stroke's three control points, in the unit box


def glyph_taxonomy(classes: int, superclasses: int | None = None) -> Taxonomy:
    """``classes`` glyphs in ``superclasses`` families (about sqrt(classes) by default).

    A family is one shared stroke; each glyph adds one to three strokes of its own. The same arguments always give
    the same glyphs.
    """
    if not 2 <= classes <= MAX_GLYPH_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_GLYPH_CLASSES} for glyphs, got {classes}")
    if superclasses is None:
        superclasses = max(1, round(math.sqrt(classes)))
    elif not 1 <= superclasses <= classes:
        raise ValueError(f"superclasses must be between 1 and {classes} for {classes} classes, got {superclasses}")
    names = tuple(f"family-{s:0{len(str(superclasses - 1))}d}" for s in range(superclasses))
    digits = len(str(classes - 1))
    leaves = []
    for s in range(superclasses):
        family_stroke = _stroke(np.random.default_rng([_ALPHABET_SEED, s]))
        for c in range(s * classes // superclasses, (s + 1) * classes // superclasses):
            rng = np.random.default_rng([_ALPHABET_SEED, superclasses, c])
            own = tuple(_stroke(rng) for _ in range(int(rng.integers(1, 4))))
            leaves.append(
                GlyphClass(id=c, name=f"{names[s]}/glyph-{c:0{digits}d}", superclass=s, strokes=(family_stroke, *own))
            )
    return Taxonomy(classes=tuple(leaves), superclasses=names)


def _stroke(rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in rng.uniform(*_CONTROL_BOX, size=(3, 2)))


@lru_cache(maxsize=1)
def _bezier_weights() -> np.ndarray:
    t = np.linspace(0.0, 1.0, _STROKE_POINTS)[:, None]
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t**2])  # (3, points, 1)


def render_glyph(rng: np.random.Generator, glyph: GlyphClass, size: int, scan_size: int = 0) -> Image.Image:
    """One handwritten instance of ``glyph``: light ink on a dark page, RGB, ``size`` pixels square.

    ``scan_size`` > 0 scans it at that resolution with ``INK_LEVELS`` levels, shown with square pixels (nearest
    neighbour) at ``size``; 0 keeps the smooth drawing.
    """
    drawn = scan_size or size
    side = drawn * _SUPERSAMPLE
    page = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(page)
    # The hand: a small rotation and slant, a size, an offset and a pen width for the whole glyph.
    angle, shear = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    transform = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) * rng.uniform(0.75, 1.05)
    offset = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    pen = rng.uniform(0.07, 0.13) * side
    for stroke in glyph.strokes:
        control = np.asarray(stroke) + rng.normal(0.0, 0.03, size=(3, 2))  # no two hands draw a stroke alike
        points = ((_bezier_weights() * control[:, None, :]).sum(axis=0) - 0.5) @ transform.T + offset
        xy = [(float(x), float(y)) for x, y in points * side]
        draw.line(xy, fill=255, width=max(1, round(pen)), joint="curve")
        for x, y in (xy[0], xy[-1]):  # round pen tips
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    ink = page.reduce(_SUPERSAMPLE)
    if scan_size:
        levels = np.rint(np.asarray(ink, dtype=np.float32) * ((INK_LEVELS - 1) / 255))
        ink = Image.fromarray((levels * (255 / (INK_LEVELS - 1))).round().astype(np.uint8))
        ink = ink.resize((size, size), Image.NEAREST)
    return ink.convert("RGB")
