"""One model's evaluation: sample every (prompt, seed) on this rank's share of the prompts, score, gather.

Prompts are split across ranks round-robin (rank ``r`` of ``W`` takes prompts ``r, r + W, ...``); all
seeds of a prompt stay on one rank, so per-prompt metrics (diversity) see every seed. Every image's
noise depends only on its (prompt index, seed) (:func:`~dmdr.evaluation.samplers.noise_for`), so the
gathered scores equal a one-process run's, whatever the world size or batch size. Images are scored
as they are sampled and then dropped (a prompt's images are kept until all its seeds are done), so
10k prompts need no more memory than one batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr.evaluation.registry import Metric, Scorer
from dmdr.evaluation.samplers import EvalModel, noise_for

log = logging.getLogger("dmdr")


@dataclass
class ModelResult:
    """What :func:`evaluate_model` returns on every rank (complete after the gather)."""

    name: str
    path: str
    kind: str
    nfe: int
    steps: int
    guidance: float | None
    resolution: int
    images: int
    seconds: float
    """Sampling wall time (the slowest rank's), scoring excluded."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Per metric: per-image scores in (prompt, seed) order, or per-prompt scores in prompt order."""
    grid: list[Tensor] = field(default_factory=list)
    """The first seed's image of each of the first ``grid_prompts`` prompts, in prompt order (CPU)."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def rank_prompts(num_prompts: int, rank: int, world: int) -> list[int]:
    """This rank's prompt indices: round-robin, so every rank gets a near-equal share."""
    return list(range(rank, num_prompts, world))


def evaluate_model(model: EvalModel, prompts: list[str], seeds: list[int], metrics: list[tuple[Metric, Scorer]],
                   *, env: Any = None, batch_size: int = 8, grid_prompts: int = 8, progress: bool = True,
                   save_dir: Path | None = None) -> ModelResult:
    """Sample and score ``model`` on ``prompts`` x ``seeds`` (this rank's share), gathered on every rank."""
    rank, world = (env.rank, env.world_size) if env is not None and env.is_distributed else (0, 1)
    items = [(p, s) for p in rank_prompts(len(prompts), rank, world) for s in seeds]
    per_image: dict[str, dict[tuple[int, int], float]] = {m.name: {} for m, _ in metrics if m.per == "image"}
    per_prompt: dict[str, dict[int, float]] = {m.name: {} for m, _ in metrics if m.per == "prompt"}
    pending: dict[int, list[Tensor]] = {}
    grid: dict[int, Tensor] = {}
    bar = _bar(len(items), model.name, progress and rank == 0)
    seconds = 0.0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        batch_prompts = [prompts[p] for p, _ in batch]
        noise = torch.stack([noise_for(p, s, model.latent_shape) for p, s in batch])
        t0 = time.perf_counter()
        images = model.sample(batch_prompts, noise)
        seconds += time.perf_counter() - t0
        for metric, scorer in metrics:
            if metric.per == "image":
                values = scorer(images, batch_prompts).detach().float().cpu().tolist()
                per_image[metric.name].update(zip(batch, values))
        images = images.detach().float().cpu()
        for (p, s), image in zip(batch, images):
            if s == seeds[0] and p < grid_prompts:
                grid[p] = image
            if save_dir is not None:
                _save(image, save_dir / f"p{p:05d}-s{s}.png")
            if per_prompt:
                pending.setdefault(p, []).append(image)
                if len(pending[p]) == len(seeds):
                    group = torch.stack(pending.pop(p))
                    for metric, scorer in metrics:
                        if metric.per == "prompt":
                            per_prompt[metric.name][p] = float(scorer(group, [prompts[p]] * len(seeds)).reshape(-1)[0])
        bar.update(len(batch))
    bar.close()
    local = {"image": per_image, "prompt": per_prompt, "grid": grid, "seconds": seconds, "images": len(items)}
    parts = _gather(local, env)
    result = ModelResult(model.name, model.path, model.kind, model.nfe, model.steps, model.guidance, model.resolution,
                         images=sum(part["images"] for part in parts), seconds=max(part["seconds"] for part in parts))
    for metric, _ in metrics:
        kind = "image" if metric.per == "image" else "prompt"
        merged: dict[Any, float] = {}
        for part in parts:
            merged.update(part[kind][metric.name])
        keys = [(p, s) for p in range(len(prompts)) for s in seeds] if kind == "image" else range(len(prompts))
        result.scores[metric.name] = [merged[k] for k in keys]
    merged_grid: dict[int, Tensor] = {}
    for part in parts:
        merged_grid.update(part["grid"])
    result.grid = [merged_grid[p] for p in sorted(merged_grid)]
    return result


def _gather(local: dict[str, Any], env: Any) -> list[dict[str, Any]]:
    if env is None or not env.is_distributed:
        return [local]
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, local)
    return parts


def _save(image: Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)


class _bar:
    """A tqdm bar over images on rank 0 (``progress``), silent otherwise."""

    def __init__(self, total: int, name: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"eval {name}", unit="img", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


__all__ = ["ModelResult", "evaluate_model", "rank_prompts"]
