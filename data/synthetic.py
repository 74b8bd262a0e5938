"""A built-in class-conditional dataset: coloured shapes drawn on the fly, no download needed.

Each class is a (shape, colour) pair; the first ten use ten shapes with ten colours, so they
differ both ways and a glance at a 32 px grid (or a small classifier) tells whether a generated
sample matches its label. With `shape_only` a class is a shape alone and each image's colour is
drawn at random, so a classifier cannot name the class from the colour. Scenes are drawn in unit
coordinates from an RNG keyed on (seed, index), so an index shows the same scene at every
resolution.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import DataError
from .images import to_tensor

SHAPES = ("circle", "square", "triangle", "plus", "ring", "bars", "star", "x", "crescent", "dots")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 30),
    "magenta": (230, 50, 200),
    "cyan": (30, 210, 220),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
    "purple": (150, 70, 230),
    "brown": (150, 95, 40),
}
SUPERSAMPLE = 4  # masks are drawn 4x larger and box-filtered: anti-aliased edges at any size


def _rect(hw: float, hh: float, dx: float = 0.0, dy: float = 0.0):
    return [(dx - hw, dy - hh), (dx + hw, dy - hh), (dx + hw, dy + hh), (dx - hw, dy + hh)]


def _regular(n: int, radii: tuple[float, ...]):
    """n * len(radii) vertices, alternating radii (a star for two), first pointing up."""
    k = n * len(radii)
    return [
        (radii[j % len(radii)] * math.cos(a), radii[j % len(radii)] * math.sin(a))
        for j, a in enumerate(-math.pi / 2 + 2 * math.pi * i / k for i in range(k))
    ]


def _parts(shape: str):
    """(value, kind, geometry) in units of the shape radius; later parts paint over earlier."""
    if shape == "circle":
        return [(255, "disc", (0, 0, 0.9))]
    if shape == "square":
        return [(255, "poly", _rect(0.8, 0.8))]
    if shape == "triangle":
        return [(255, "poly", _regular(3, (1.1,)))]
    if shape in ("plus", "x"):
        arms = [_rect(1.0, 0.3), _rect(0.3, 1.0)]
        if shape == "x":
            c = s = math.sqrt(0.5)
            arms = [[(x * c - y * s, x * s + y * c) for x, y in arm] for arm in arms]
        return [(255, "poly", arm) for arm in arms]
    if shape == "ring":
        return [(255, "disc", (0, 0, 1.0)), (0, "disc", (0, 0, 0.55))]
    if shape == "bars":
        return [(255, "poly", _rect(1.0, 0.18, 0, dy)) for dy in (-0.66, 0, 0.66)]
    if shape == "star":
        return [(255, "poly", _regular(5, (1.1, 0.45)))]
    if shape == "crescent":
        return [(255, "disc", (0, 0, 0.95)), (0, "disc", (0.45, -0.25, 0.8))]
    return [(255, "disc", (dx, dy, 0.3)) for dx in (-0.55, 0.55) for dy in (-0.55, 0.55)]


def class_style(label: int) -> tuple[str, str]:
    """Class c: shape c % 10 with colour (c % 10 + c // 10) % 10, distinct pairs for c < 100."""
    shape = label % len(SHAPES)
    return SHAPES[shape], list(COLOURS)[(shape + label // len(SHAPES)) % len(COLOURS)]


class SyntheticShapes(torch.utils.data.Dataset):
    """Index i -> (image in [-1, 1], i % num_classes), a pure function of (seed, i, image_size)."""

    def __init__(
        self,
        image_size: int,
        num_classes: int = 10,
        length: int = 10_000,
        seed: int = 0,
        shape_only: bool = False,
    ):
        most = len(SHAPES) if shape_only else len(SHAPES) * len(COLOURS)
        if not 1 <= num_classes <= most:
            kind = "shape-only synthetic" if shape_only else "synthetic"
            raise DataError(f"{kind} data has 1..{most} classes, not {num_classes}")
        self.image_size, self.length, self.seed = image_size, length, seed
        self.shape_only = shape_only
        if shape_only:
            self.classes = list(SHAPES[:num_classes])
        else:
            self.classes = [" ".join(reversed(class_style(c))) for c in range(num_classes)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        label = index % self.num_classes
        return to_tensor(self.render(index, label)), label

    def render(self, index: int, label: int) -> np.ndarray:
        """uint8 HWC: a gradient background, one jittered shape in a jittered class colour (a
        random colour for shape-only classes)."""
        rng = np.random.default_rng((self.seed, index))
        top, bottom = rng.uniform(10, 60, size=(2, 3))
        cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
        radius = rng.uniform(0.22, 0.3)
        angle = math.radians(rng.uniform(-15, 15))
        shape, colour = class_style(label)
        if self.shape_only:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
        colour = np.clip(
            np.array(COLOURS[colour]) * rng.uniform(0.8, 1.05) + rng.uniform(-12, 12, size=3),
            0,
            255,
        )

        size = self.image_size * SUPERSAMPLE
        cos, sin = math.cos(angle), math.sin(angle)

        def px(x, y):  # shape units -> supersampled pixels, rotated about the centre
            return (
                (cx + radius * (x * cos - y * sin)) * size,
                (cy + radius * (x * sin + y * cos)) * size,
            )

        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        for value, kind, geom in _parts(shape):
            if kind == "poly":
                draw.polygon([px(x, y) for x, y in geom], fill=value)
            else:
                (x, y), r = px(geom[0], geom[1]), geom[2] * radius * size
                draw.ellipse((x - r, y - r, x + r, y + r), fill=value)
        n = self.image_size
        alpha = np.asarray(mask.resize((n, n), Image.BOX), np.float32)[..., None] / 255
        ramp = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
        background = top + (bottom - top) * ramp
        return np.rint(background * (1 - alpha) + colour * alpha).astype(np.uint8)
