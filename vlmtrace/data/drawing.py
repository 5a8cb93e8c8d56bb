"""Synthetic scenes of coloured shapes: what is in a picture, and how it is drawn.

The organisms of `vlmtrace.models.zoo` learn to read these pictures, and their causal traces
are only interpretable if the pictures are: every scene is a short list of `Shape`s (colour,
kind, size, grid cell, sub-cell jitter), drawn exactly (no anti-aliasing, no noise) so that a
counterfactual scene that changes one attribute changes nothing else, pixel for pixel.

    rng = random.Random(0)
    scene = random_scene(rng, objects=2)
    picture = to_image(scene)                       # a 32x32 PIL image
    pair = with_shape(scene, 0, kind="circle")      # the same scene, one attribute changed

Shapes sit near the centres of the 8-pixel patch grid of the organisms' vision towers: in
the first prototype, shapes placed anywhere stalled shape recognition at chance
(../shared/NOTES.md). All randomness goes through `random.Random.random()`, the one method
whose stream Python promises never to change, so a seed means the same scenes everywhere.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # cells per side; one cell = one vision-tower patch
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 200),
}
KINDS = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 2.0, "large": 3.0}  # half-width in pixels
# Pixels a centre may move off its cell centre (pixel 4 of 8), per axis, as far as the shape
# stays inside its patch. The shipped data uses none: with one pixel of jitter, kind recognition
# did not start within the organisms' training budget (measured; straddling patches is worse).
JITTER = (0,)
TEST_FRACTION = 5  # one scene in TEST_FRACTION is held out (decided by a hash of the scene)


@dataclass(frozen=True)
class Shape:
    """One object: what it is (colour, kind, size) and where (cell, jitter)."""

    colour: str
    kind: str
    size: str
    cell: tuple[int, int]  # (row, column) on the GRID x GRID patch grid
    jitter: tuple[int, int] = (0, 0)  # (dy, dx) in pixels

    @property
    def side(self) -> str:
        """Which half of the picture the shape is in."""
        return "left" if self.cell[1] < GRID // 2 else "right"


Scene = tuple[Shape, ...]


def pick(rng: random.Random, options: Sequence):
    """One element of `options`, using only `rng.random()` (stable across Python versions)."""
    return options[int(rng.random() * len(options))]


def shuffled(rng: random.Random, options: Sequence) -> list:
    """A Fisher-Yates shuffle of `options` built on `rng.random()` alone."""
    out = list(options)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def split_of(scene: Scene) -> str:
    """ "test" for the held-out fifth of all possible scenes, else "train".

    The split is a property of the scene itself (a hash of its shapes), so training and
    evaluation can draw from any seed and still never share a picture.
    """
    key = repr(sorted((s.colour, s.kind, s.size, s.cell, s.jitter) for s in scene))
    return "test" if zlib.crc32(key.encode()) % TEST_FRACTION == 0 else "train"


def random_scene(rng: random.Random, *, objects: int = 2, split: str | None = None) -> Scene:
    """`objects` shapes with distinct colours, distinct kinds and distinct cells.

    Distinct colours and kinds make "the red shape" and "the cross shape" name exactly one
    object. With `split`, scenes of the other split are redrawn.
    """
    while True:
        colours = shuffled(rng, list(COLOURS))[:objects]
        kinds = shuffled(rng, KINDS)[:objects]
        cells = shuffled(rng, [(r, c) for r in range(GRID) for c in range(GRID)])[:objects]
        sizes = [pick(rng, list(SIZES)) for _ in cells]
        scene = tuple(
            Shape(colour, kind, size, cell, (pick(rng, jitters(size)), pick(rng, jitters(size))))
            for colour, kind, size, cell in zip(colours, kinds, sizes, cells, strict=False)
        )
        if split is None or split_of(scene) == split:
            return scene


def jitters(size: str) -> tuple[int, ...]:
    """The offsets of `JITTER` that keep a shape of `size` inside its patch."""
    r, centre = SIZES[size], PATCH // 2
    return tuple(j for j in JITTER if centre + j - r >= 0 and centre + j + r <= PATCH - 1)


def with_shape(scene: Scene, index: int, **changes) -> Scene:
    """The same scene with attributes of shape `index` changed (a semantic image pair)."""
    return tuple(replace(s, **changes) if i == index else s for i, s in enumerate(scene))


def free_cells(scene: Scene) -> list[tuple[int, int]]:
    """Grid cells no shape occupies, in row-major order."""
    taken = {s.cell for s in scene}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]


_Y, _X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _mask(shape: Shape) -> np.ndarray:
    """Pixels covered by `shape`, as a boolean [IMAGE_SIZE, IMAGE_SIZE] array."""
    r = SIZES[shape.size]
    cy = shape.cell[0] * PATCH + PATCH // 2 + shape.jitter[0]
    cx = shape.cell[1] * PATCH + PATCH // 2 + shape.jitter[1]
    dy, dx = _Y - cy, _X - cx
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape.kind == "circle":
        return dx * dx + dy * dy <= r * r + r
    if shape.kind == "square":
        return box
    if shape.kind == "triangle":  # apex up, base at the bottom of the box
        return box & (np.abs(dx) <= (dy + r) / 2)
    if shape.kind == "cross":
        return box & ((np.abs(dx) <= r // 3) | (np.abs(dy) <= r // 3))
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {KINDS}")


def box(shape: Shape) -> tuple[int, int, int, int]:
    """The exact box (x0, y0, x1, y1, pixels, x1 and y1 exclusive) of the pixels `shape` covers."""
    ys, xs = np.nonzero(_mask(shape))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] array on a black background."""
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for shape in scene:
        pixels[_mask(shape)] = COLOURS[shape.colour]
    return pixels


def to_image(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image, the form processors and `Sample.image` expect."""
    return Image.fromarray(render(scene), mode="RGB")
