"""ShapeEval: an exact checker of shapes-world images against their prompts (the world's GenEval).

Every pixel is assigned to the nearest of black (background) and the six palette colours; it is
*clean* when it lies within :data:`CLEAN_DISTANCE` of that colour. The clean palette pixels of each
colour split into 4-connected components; a component of at least :data:`MIN_OBJECT_AREA` pixels is
an *object*, smaller ones are specks. An object's shape comes from how much of its bounding box it
fills (square ~1, circle ~0.78, triangle ~0.5) and its aspect ratio.

Per image and prompt (:class:`~dmdr.worlds.shapes.scene.Scene`):

========== =========================================================================================
colour     every group's colour is the colour of at least one object
shape      every group has at least one object of its colour and shape
count      every group has exactly ``count`` objects of its colour and shape, and there are no others
position   (two-group prompts) the centroid of the first group's object is on the stated side of the
           second's (at least :data:`POSITION_MIN_OFFSET` pixels apart along that axis)
exact      all of the above at once
fidelity   the fraction of pixels that are clean background or belong to an object (blur, off-palette
           colours and specks lower it; 1.0 on renders)
========== =========================================================================================

:func:`evaluate` returns the per-image booleans; :func:`summarize` the accuracy of each attribute,
``exact``, and ``overall``: the mean of the four attribute accuracies, as GenEval's overall score is the
mean of its task accuracies. Renders score 1.0 on every attribute; uniform noise scores near chance (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dmdr.worlds.shapes.scene import COLORS, Scene, parse_prompt, relation_offset

CLEAN_DISTANCE = 0.35
"""Euclidean RGB distance within which a pixel counts as its nearest palette (or background) colour."""
MIN_OBJECT_AREA = 12
"""Components smaller than this many pixels are specks, not objects (the smallest render has 25)."""
POSITION_MIN_OFFSET = 1.0
ATTRIBUTES = ("colour", "shape", "count", "position")

_PALETTE = torch.tensor([(0.0, 0.0, 0.0), *COLORS.values()])
_NAMES = ("background", *COLORS)


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    area: int
    center: tuple[float, float]


def classify_shape(fill: float, aspect: float) -> str:
    """Shape from the fraction of the bounding box filled and its aspect ratio (width / height)."""
    if fill >= 0.9 and 0.75 <= aspect <= 1.33:
        return "square"
    if fill >= 0.64 and 0.7 <= aspect <= 1.43:
        return "circle"
    if 0.35 <= fill < 0.64:
        return "triangle"
    return "blob"


def _components(mask: Tensor) -> Tensor:
    """4-connected component labels of a ``(N, H, W)`` boolean mask batch (0 = not in the mask).

    Label propagation: every masked pixel starts with its own index and repeatedly takes the largest
    label among its masked 4-neighbours until nothing changes.
    """
    n, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.int64).view(1, h, w).expand(n, h, w) * mask
    while True:
        padded = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        best = torch.stack([labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                            padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]).amax(0) * mask
        if torch.equal(best, labels):
            return labels
        labels = best


def detect(images: Tensor) -> tuple[list[list[DetectedObject]], Tensor]:
    """Objects in each image and each image's fidelity.

    Args:
        images: ``(B, 3, H, W)`` RGB in ``[0, 1]``.

    Returns:
        (objects per image, ``(B,)`` fidelity).
    """
    images = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = images.shape
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(b, h * w, 3), _PALETTE.unsqueeze(0).expand(b, -1, -1))
    best, index = dist.min(-1)
    index = index.view(b, h, w)
    clean = (best <= CLEAN_DISTANCE).view(b, h, w)
    k = len(_NAMES) - 1
    # One batch of masks (image, colour): components of all of them at once.
    masks = clean.unsqueeze(1) & (index.unsqueeze(1) == torch.arange(1, k + 1).view(1, k, 1, 1))
    labels = _components(masks.view(b * k, h, w)).view(b * k, h * w)
    # Per (mask, label) statistics by scatter: area, bounding box, centroid.
    size = h * w + 1
    key = (torch.arange(b * k).view(-1, 1) * size + labels).flatten()
    inside = labels.flatten() > 0
    key = key[inside]
    rows = (torch.arange(h * w) // w).repeat(b * k)[inside]
    cols = (torch.arange(h * w) % w).repeat(b * k)[inside]
    uniq, inverse, area = torch.unique(key, return_inverse=True, return_counts=True)
    n = uniq.numel()

    def reduce(values: Tensor, how: str) -> Tensor:
        init = torch.full((n,), h * w if how == "amin" else -1, dtype=torch.int64)
        return init.scatter_reduce(0, inverse, values, how, include_self=True)

    r0, r1, c0, c1 = reduce(rows, "amin"), reduce(rows, "amax"), reduce(cols, "amin"), reduce(cols, "amax")
    rsum = torch.zeros(n).scatter_add_(0, inverse, rows.float())
    csum = torch.zeros(n).scatter_add_(0, inverse, cols.float())
    objects: list[list[DetectedObject]] = [[] for _ in range(b)]
    is_object = area >= MIN_OBJECT_AREA
    for j in torch.nonzero(is_object).flatten().tolist():
        mask_id = int(uniq[j]) // size
        image, colour = divmod(mask_id, k)
        height, width = int(r1[j] - r0[j]) + 1, int(c1[j] - c0[j]) + 1
        a = int(area[j])
        objects[image].append(DetectedObject(_NAMES[colour + 1], classify_shape(a / (height * width), width / height),
                                             a, (float(rsum[j]) / a, float(csum[j]) / a)))
    # Explained pixels: clean background, or inside an object (not a speck).
    in_object = torch.zeros(b * k * size, dtype=torch.bool)
    in_object[uniq[is_object]] = True
    full_key = (torch.arange(b * k).view(-1, 1) * size + labels)
    pixel_in_object = in_object[full_key].view(b, k, h * w).any(1) & (labels.view(b, k, h * w) > 0).any(1)
    explained = (clean & (index == 0)).view(b, h * w) | pixel_in_object
    return objects, explained.float().mean(1)


def check(scene: Scene, objects: list[DetectedObject]) -> dict[str, bool | None]:
    """The attribute checks of one image (``position`` is None for one-group prompts)."""
    def matches(g):
        return [o for o in objects if o.color == g.color and o.shape == g.shape]

    colour = all(any(o.color == g.color for o in objects) for g in scene.groups)
    shape = all(matches(g) for g in scene.groups)
    count = all(len(matches(g)) == g.count for g in scene.groups) and len(objects) == scene.num_objects
    position = None
    if scene.relation is not None:
        first, second = matches(scene.groups[0]), matches(scene.groups[1])
        position = bool(first and second and relation_offset(first[0].center, second[0].center, scene.relation)
                        >= POSITION_MIN_OFFSET)
    exact = colour and shape and count and (position is None or position)
    return {"colour": colour, "shape": shape, "count": count, "position": position, "exact": exact}


def evaluate(images: Tensor, prompts: list[str]) -> list[dict[str, float | bool | None]]:
    """Per-image ShapeEval results: the attribute booleans and ``fidelity``.

    Raises:
        ValueError: a prompt is not a shapes-world prompt, or the counts differ.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    scenes = [parse_prompt(p) for p in prompts]
    objects, fidelity = detect(images)
    out = []
    for scene, objs, fid in zip(scenes, objects, fidelity.tolist()):
        row: dict[str, float | bool | None] = dict(check(scene, objs))
        row["fidelity"] = fid
        out.append(row)
    return out


def summarize(rows: list[dict[str, float | bool | None]]) -> dict[str, float]:
    """``overall`` (mean of the attribute accuracies), each attribute's accuracy (over the images where it
    applies), ``exact`` and the mean fidelity."""
    summary = {}
    for key in (*ATTRIBUTES, "exact", "fidelity"):
        values = [float(r[key]) for r in rows if r[key] is not None]
        summary[key] = sum(values) / len(values) if values else float("nan")
    attributes = [summary[k] for k in ATTRIBUTES if summary[k] == summary[k]]  # skip NaN (no two-group prompt)
    return {"overall": sum(attributes) / len(attributes), **summary}


__all__ = ["ATTRIBUTES", "DetectedObject", "classify_shape", "detect", "check", "evaluate", "summarize"]
