"""The shapes world: prompts about coloured shapes, their scenes, and an exact renderer.

A prompt names one or two *groups* of objects; a group is a colour, a shape and a count, and two
groups are tied by a spatial relation::

    "a red circle"                          one group, count 1
    "two blue squares"                      one group, count 2
    "a red circle left of a green triangle" two groups and a relation (centroid of the first
                                            object left of / right of / above / below the second's)

Images are ``(3, S, S)`` RGB in ``[0, 1]`` (``S`` = 32 by default): flat palette colours on black,
objects of side 7-10 pixels that never touch. The vocabulary is small and closed (:data:`VOCAB`),
so the world's tokenizer is word-level, and the grammar is exact, so :func:`parse_prompt` inverts
:func:`Scene.prompt` and :mod:`dmdr.worlds.shapes.shapeeval` can check any image against any prompt.

The prompts split into a training set and a held-out set by a hash of the prompt text
(:func:`is_held_out`): the teacher and DMDR train on the first, every evaluation uses the second.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
"""The palette: the six saturated corners of the RGB cube (black is the background)."""
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "a", 2: "two"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
VOCAB = tuple(dict.fromkeys(
    [*COUNT_WORDS.values(), *COLORS, *SHAPES, *PLURAL.values(), "left", "right", "of", "above", "below"]))
"""Every word a prompt can contain."""

IMAGE_SIZE = 32
MIN_SIDE, MAX_SIDE = 7, 10
GAP = 2
"""Pixels of background kept between any two objects (so connected components separate them)."""
MARGIN = 1
"""Pixels of background kept at the image border."""
RELATION_MIN_OFFSET = 4.0
"""A relation holds when the centroids differ by at least this many pixels along its axis."""
HELD_OUT_PERCENT = 15


@dataclass(frozen=True)
class Group:
    color: str
    shape: str
    count: int = 1

    def words(self) -> str:
        noun = self.shape if self.count == 1 else PLURAL[self.shape]
        return f"{COUNT_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: one or two groups and, with two, the relation of the first to the second."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def prompt(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].words()
        return f"{self.groups[0].words()} {self.relation} {self.groups[1].words()}"

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)


def parse_prompt(prompt: str) -> Scene:
    """The :class:`Scene` of a world prompt (the inverse of :meth:`Scene.prompt`).

    Raises:
        ValueError: the text is not a prompt of this world.
    """
    words = prompt.strip().split()
    singular = {v: k for k, v in PLURAL.items()}
    counts = {v: k for k, v in COUNT_WORDS.items()}

    def group(ws: list[str]) -> Group:
        if len(ws) != 3 or ws[0] not in counts or ws[1] not in COLORS:
            raise ValueError(f"not a shapes-world prompt: {prompt!r}")
        count, noun = counts[ws[0]], ws[2]
        shape = noun if count == 1 else singular.get(noun, "")
        if shape not in SHAPES or (count == 1) != (noun in SHAPES):
            raise ValueError(f"not a shapes-world prompt: {prompt!r}")
        return Group(ws[1], shape, count)

    if len(words) == 3:
        return Scene((group(words),))
    for rel in RELATIONS:
        n = len(rel.split())
        if len(words) == 6 + n and " ".join(words[3:3 + n]) == rel:
            return Scene((group(words[:3]), group(words[3 + n:])), rel)
    raise ValueError(f"not a shapes-world prompt: {prompt!r}")


def all_scenes() -> list[Scene]:
    """Every prompt of the world: single groups (count 1 or 2) and related pairs of single objects."""
    scenes = [Scene((Group(c, s, n),)) for n in COUNT_WORDS for c in COLORS for s in SHAPES]
    for c1 in COLORS:
        for s1 in SHAPES:
            for rel in RELATIONS:
                for c2 in COLORS:
                    for s2 in SHAPES:
                        if c2 != c1:
                            scenes.append(Scene((Group(c1, s1), Group(c2, s2)), rel))
    return scenes


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out split (a stable hash of its text)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


def split_prompts(split: str) -> list[str]:
    """The world's prompts of ``split`` (``train`` or ``heldout``), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [s.prompt() for s in all_scenes() if is_held_out(s.prompt()) == want]


def sample_scenes(n: int, generator: torch.Generator, split: str = "train",
                  single_fraction: float = 0.3) -> list[Scene]:
    """``n`` scenes of ``split``: a ``single_fraction`` of one-group prompts, the rest related pairs."""
    prompts = split_prompts(split)
    singles = [p for p in prompts if len(p.split()) == 3]
    pairs = [p for p in prompts if len(p.split()) > 3]
    out = []
    for _ in range(n):
        pool = singles if (torch.rand((), generator=generator).item() < single_fraction and singles) else pairs
        out.append(parse_prompt(pool[int(torch.randint(len(pool), (), generator=generator))]))
    return out


# ----------------------------------------------------------------------------------------------- #
# Rendering
# ----------------------------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Placed:
    """One object on the canvas: top-left corner (row, col) and side."""

    color: str
    shape: str
    row: int
    col: int
    side: int

    @property
    def center(self) -> tuple[float, float]:
        return self.row + (self.side - 1) / 2, self.col + (self.side - 1) / 2


def shape_mask(shape: str, side: int) -> Tensor:
    """The ``(side, side)`` boolean footprint of a shape (pixel centres inside the figure)."""
    c = (torch.arange(side, dtype=torch.float64) + 0.5) / side  # pixel centres in (0, 1)
    y, x = torch.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return torch.ones(side, side, dtype=torch.bool)
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up, base the full bottom edge
        return y >= 2 * (x - 0.5).abs()
    raise ValueError(f"unknown shape {shape!r}")


def _fits(box: tuple[int, int, int], placed: list[Placed]) -> bool:
    r, c, s = box
    for p in placed:
        if r < p.row + p.side + GAP and p.row < r + s + GAP and c < p.col + p.side + GAP and p.col < c + s + GAP:
            return False
    return True


def relation_offset(a: tuple[float, float], b: tuple[float, float], relation: str) -> float:
    """How far (pixels) centre ``a`` = (row, col) lies on the ``relation`` side of centre ``b`` (< 0: wrong side)."""
    (ra, ca), (rb, cb) = a, b
    return {"left of": cb - ca, "right of": ca - cb, "above": rb - ra, "below": ra - rb}[relation]


def layout(scene: Scene, generator: torch.Generator, size: int = IMAGE_SIZE, tries: int = 200) -> list[Placed]:
    """Random non-touching placements of the scene's objects that satisfy its relation."""
    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    for _ in range(tries):
        placed: list[Placed] = []
        ok = True
        for g in scene.groups:
            for _ in range(g.count):
                for _ in range(50):
                    side = rand(MIN_SIDE, MAX_SIDE)
                    box = (rand(MARGIN, size - MARGIN - side), rand(MARGIN, size - MARGIN - side), side)
                    if _fits(box, placed):
                        placed.append(Placed(g.color, g.shape, *box))
                        break
                else:
                    ok = False
        if ok and (scene.relation is None
                   or relation_offset(placed[0].center, placed[1].center, scene.relation) >= RELATION_MIN_OFFSET):
            return placed
    raise RuntimeError(f"could not lay out {scene.prompt()!r} on a {size}x{size} canvas")


def render(placed: list[Placed], size: int = IMAGE_SIZE) -> Tensor:
    """The ``(3, size, size)`` image of placed objects (flat colours on black)."""
    image = torch.zeros(3, size, size)
    for p in placed:
        m = shape_mask(p.shape, p.side)
        color = torch.tensor(COLORS[p.color]).view(3, 1, 1)
        region = image[:, p.row:p.row + p.side, p.col:p.col + p.side]
        region[:] = torch.where(m, color, region)
    return image


def render_batch(scenes: list[Scene], generator: torch.Generator, size: int = IMAGE_SIZE) -> Tensor:
    """``(B, 3, size, size)`` renders of fresh random layouts of ``scenes``."""
    return torch.stack([render(layout(s, generator, size), size) for s in scenes])


def ideal_area_fraction(shape: str) -> float:
    """Mean footprint of one object of ``shape`` as a fraction of the canvas (for the reward's scale)."""
    sides = range(MIN_SIDE, MAX_SIDE + 1)
    return sum(float(shape_mask(shape, s).sum()) for s in sides) / len(sides) / IMAGE_SIZE**2


__all__ = [
    "COLORS", "SHAPES", "RELATIONS", "VOCAB", "IMAGE_SIZE", "Group", "Scene", "Placed", "parse_prompt", "all_scenes",
    "is_held_out", "split_prompts", "sample_scenes", "shape_mask", "relation_offset", "layout", "render",
    "render_batch", "ideal_area_fraction",
]
