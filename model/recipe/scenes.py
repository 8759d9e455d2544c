"""Scenes for the recipe: camera-like frames rendered with Pillow, and their captions.

Design decisions:

- A scene is one or two groups of identical shapes (colour x shape x count) on a
  light background, with jitter in size, place, background and a little noise, so
  the caption is fully determined by what is drawn: ``two red circles on the left``,
  ``a blue square and three green stars``. Two groups are named left to right (by
  each group's leftmost shape): an order read off the picture, not the sampler's.
- Frames are rendered directly at 384x384, the size Gemma 4's resize picks for a
  square picture at 70 soft tokens, so patching is exact (8x8 = 64 cells).
- Held-out compositions: some (colour, shape) pairs never appear in training, so
  the caption accuracy measures composition, not memory.
- ``cell_labels`` says, per 48-px cell, the colour and shape of the object centred
  in it (or none): the training-only vision loss reads it (``train.vision_loss``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from rawcast.model.recipe.text import number_words

SIZE = 384
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "black": (20, 20, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "brown": (120, 70, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
HELDOUT_PAIRS = frozenset(
    {
        ("green", "triangle"),
        ("red", "star"),
        ("blue", "square"),
        ("orange", "circle"),
        ("purple", "star"),
    }
)
REGIONS = {  # name: (x0, y0, x1, y1) as fractions of the frame, for single groups
    "on the left": (0.0, 0.1, 0.45, 0.9),
    "on the right": (0.55, 0.1, 1.0, 0.9),
    "at the top": (0.1, 0.0, 0.9, 0.45),
    "at the bottom": (0.1, 0.55, 0.9, 1.0),
}


CELL = 48  # pixels per side of a patch cell (``pipeline.vision``): an 8x8 grid at SIZE


@dataclass(frozen=True)
class Group:
    colour: str
    shape: str
    count: int


def describe(groups: list[Group], region: str | None) -> str:
    parts = []
    for g in groups:
        det = number_words(g.count) if g.count > 1 else "an" if g.colour[0] in "aeiou" else "a"
        parts.append(f"{det} {g.colour} {g.shape if g.count == 1 else PLURAL[g.shape]}")
    text = " and ".join(parts)
    return f"{text} {region}" if region else text


def _draw_shape(
    d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * float(np.cos(ang)), cy + rr * float(np.sin(ang))))
        d.polygon(pts, fill=fill)


def sample_groups(rng: random.Random, heldout: bool) -> tuple[list[Group], str | None]:
    """Groups and region of a scene; ``heldout`` scenes hold at least one held-out pair."""
    while True:
        n_groups = 1 if rng.random() < 0.55 else 2
        pairs: list[tuple[str, str]] = []
        while len(pairs) < n_groups:
            p = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            if p not in pairs:
                pairs.append(p)
        has_held = any(p in HELDOUT_PAIRS for p in pairs)
        if has_held == heldout:
            break
    groups = [Group(c, s, rng.randint(1, 3)) for c, s in pairs]
    region = rng.choice(list(REGIONS)) if n_groups == 1 else None
    return groups, region


@dataclass(frozen=True)
class Placed:
    colour: str
    shape: str
    cx: float
    cy: float


def render(
    groups: list[Group], region: str | None, rng: random.Random
) -> tuple[npt.NDArray[np.uint8], list[Placed]]:
    """The scene as an RGB uint8 (384, 384, 3) frame, and where each shape went. Shapes
    never overlap."""
    bg = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    objects: list[Placed] = []
    box = REGIONS[region] if region else (0.0, 0.0, 1.0, 1.0)
    for g in groups:
        r = rng.uniform(22, 36) if g.count > 1 or len(groups) > 1 else rng.uniform(28, 48)
        for _ in range(g.count):
            for _try in range(200):
                cx = rng.uniform(box[0] * SIZE + r + 4, box[2] * SIZE - r - 4)
                cy = rng.uniform(box[1] * SIZE + r + 4, box[3] * SIZE - r - 4)
                if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 6) ** 2 for x, y, rr in placed):
                    break
            placed.append((cx, cy, r))
            objects.append(Placed(g.colour, g.shape, cx, cy))
            jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[g.colour])
            _draw_shape(d, g.shape, cx, cy, r, jitter)  # type: ignore[arg-type]  # 3-tuple
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-6, 7, arr.shape)
    return np.clip(arr + noise, 0, 255).astype(np.uint8), objects


def cell_labels(objects: list[Placed]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per cell in raster order (y outer, x inner): colour class (0 none, 1 + index in
    COLOURS) and shape class (0 none, 1 + index in SHAPES) of the object centred there."""
    n = SIZE // CELL
    colour = np.zeros(n * n, dtype=np.int64)
    shape = np.zeros(n * n, dtype=np.int64)
    names = list(COLOURS)
    for o in objects:
        cell = min(n - 1, int(o.cy // CELL)) * n + min(n - 1, int(o.cx // CELL))
        colour[cell] = 1 + names.index(o.colour)
        shape[cell] = 1 + SHAPES.index(o.shape)
    return colour, shape


def labelled_scene(
    seed: int, index: int, heldout: bool = False
) -> tuple[npt.NDArray[np.uint8], str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """``scene`` and its ``cell_labels``."""
    rng = random.Random(f"scene-{seed}-{index}-{int(heldout)}")
    groups, region = sample_groups(rng, heldout)
    frame, objects = render(groups, region, rng)
    return frame, describe(reading_order(groups, objects), region), cell_labels(objects)


def reading_order(groups: list[Group], objects: list[Placed]) -> list[Group]:
    """Groups sorted by the x of their leftmost shape."""

    def left(g: Group) -> float:
        return min(o.cx for o in objects if (o.colour, o.shape) == (g.colour, g.shape))

    return sorted(groups, key=left)


def scene(seed: int, index: int, heldout: bool = False) -> tuple[npt.NDArray[np.uint8], str]:
    """Scene number ``index`` of a seeded stream: (frame, caption)."""
    frame, caption, _ = labelled_scene(seed, index, heldout)
    return frame, caption


def scene_caption(seed: int, index: int, heldout: bool = False) -> str:
    """The caption of ``scene(seed, index, heldout)``."""
    return labelled_scene(seed, index, heldout)[1]
