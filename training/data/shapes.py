"""A generated dataset for the demo and the tests: coloured shapes, no files.

Each image shows one or two shapes (circle, square, triangle) in one of four colours,
at random sizes and positions on a noisy grey background. The labels are the 12
colour x shape pairs present ("red circle", ...); the caption names them and, for two
shapes, their layout: "a red circle above a blue square", "a green triangle left of a
red circle". So a model must bind each colour to its shape (a red circle with a blue
square shares no label with a blue circle with a red square) wherever the shapes sit,
and the text side must keep word order, which the bigram vocabulary does.

Everything follows from ``seed``: sample i is drawn from its own generator
``default_rng([seed, i])``, so any subset renders the same without the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from .sources import CrossModalData

COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 200, 40)}
SHAPES = ("circle", "square", "triangle")
LABEL_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# relation of the first-named shape to the second, and the one that says the same from the other side
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SHAPES_NGRAM_MAX = 2


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    cx: float  # centre, in pixels
    cy: float
    half: float  # half of the side / radius, in pixels
    jitter: tuple[int, int, int]  # per-shape colour variation


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    caption: str
    background: int
    noise_seed: int

    @property
    def label_names(self) -> set[str]:
        return {f"{s.colour} {s.shape}" for s in self.shapes}


def _draw_scene(rng: np.random.Generator, size: int, single_prob: float) -> Scene:
    colour_names = list(COLOURS)
    n_shapes = 1 if rng.random() < single_prob else 2
    pairs = rng.choice(len(colour_names) * len(SHAPES), size=n_shapes, replace=False)
    halves = rng.uniform(0.11, 0.17, size=n_shapes) * size
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    centres = []
    for k, half in enumerate(halves):
        lo, hi = half + 1, size - half - 1
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if n_shapes == 2:
            # shape 0 lies wholly on the `relation` side of the centre line, shape 1 wholly on
            # the other, so "above" / "left of" hold and the two never overlap
            first_side = relation in ("above", "left of")
            low_half = (k == 0) == first_side  # top or left half
            mid = size / 2
            span = (lo, mid - 1 - half) if low_half else (mid + 1 + half, hi)
            coord = rng.uniform(*span)
            if relation in ("above", "below"):
                y = coord
            else:
                x = coord
        centres.append((x, y))
    specs = []
    for pair, half, (x, y) in zip(pairs, halves, centres):
        colour, shape = colour_names[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
        specs.append(ShapeSpec(colour, shape, float(x), float(y), float(half),
                               tuple(int(v) for v in rng.integers(-20, 21, size=3))))
    if n_shapes == 1:
        caption = f"a {specs[0].colour} {specs[0].shape}"
    else:
        a, b = specs
        if rng.random() < 0.5:  # name the second shape first half of the time
            a, b, relation = b, a, RELATIONS[relation]
        caption = f"a {a.colour} {a.shape} {relation} a {b.colour} {b.shape}"
    return Scene(tuple(specs), caption, int(rng.integers(70, 190)), int(rng.integers(2**31)))


def render_scene(scene: Scene, size: int) -> Image.Image:
    bg = scene.background
    image = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[s.colour], s.jitter))
        box = (s.cx - s.half, s.cy - s.half, s.cx + s.half, s.cy + s.half)
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.half), (s.cx - s.half, s.cy + s.half), (s.cx + s.half, s.cy + s.half)], fill=fill)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 8.0, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


class ShapeImages:
    """Renders scene i on request; nothing is stored but the scene descriptions."""

    def __init__(self, scenes: list[Scene], size: int):
        self.scenes, self.size = scenes, size

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        return render_scene(self.scenes[i], self.size)  # rendered, not decoded: min_side has no use


def make_shapes(n: int = 5000, seed: int = 0, image_size: int = 64, single_prob: float = 0.3) -> CrossModalData:
    """``n`` generated samples. The captions are kept raw (their vocabulary takes unigrams
    and bigrams), so the vocabulary is built from the training split like any other."""
    if n < 1:
        raise DataError(f"the shapes dataset needs n >= 1, got {n}")
    if image_size < 16:
        raise DataError(f"image_size must be at least 16 pixels, got {image_size}")
    scenes = [_draw_scene(np.random.default_rng([seed, i]), image_size, single_prob) for i in range(n)]
    labels = np.zeros((n, len(LABEL_NAMES)), dtype=np.float32)
    position = {name: j for j, name in enumerate(LABEL_NAMES)}
    for i, scene in enumerate(scenes):
        labels[i, [position[name] for name in scene.label_names]] = 1.0
    texts = [[scene.caption] for scene in scenes]
    return CrossModalData("shapes", ShapeImages(scenes, image_size), labels, list(LABEL_NAMES),
                          texts=texts, ngram_max=SHAPES_NGRAM_MAX,
                          info={"source": "shapes", "n": n, "seed": seed, "image_size": image_size,
                                "single_prob": single_prob})


def captions(data: CrossModalData) -> list[str]:
    """The captions of a generated dataset, in sample order."""
    if not isinstance(data.images, ShapeImages):
        raise DataError(f"{data.name} is not a generated shapes dataset")
    return [scene.caption for scene in data.images.scenes]
