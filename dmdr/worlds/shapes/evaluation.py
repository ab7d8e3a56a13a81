"""Sampling and scoring models of the shapes world on held-out prompts with fixed noise.

Every model is sampled from the same noise for the same prompt and seed, so two rows of a table
compare image by image: the teacher with its multi-step CFG sampler
(:func:`dmdr.sampling.teacher_sample`), any network (teacher or student) with the few-step sampler the
student uses (:func:`dmdr.sampling.few_step_sample` on :func:`dmdr.schedules.few_step_timesteps`).
Scores: ShapeEval (overall and per attribute), fidelity and the world's reward, per seed and as
mean +- std over seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dmdr.models.base import Backbone, Conditioning, repeat_conditioning
from dmdr.sampling import few_step_sample, teacher_sample
from dmdr.schedules import few_step_timesteps
from dmdr.worlds.shapes.reward import ShapesReward
from dmdr.worlds.shapes.scene import split_prompts
from dmdr.worlds.shapes.shapeeval import ATTRIBUTES, evaluate, summarize

PredictFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def heldout_prompts(n: int) -> list[str]:
    """``n`` held-out prompts, spread evenly over the split's fixed order (the same list every time)."""
    prompts = split_prompts("heldout")
    if n >= len(prompts):
        return prompts
    stride = len(prompts) / n
    return [prompts[int(i * stride)] for i in range(n)]


@dataclass(frozen=True)
class Sampler:
    """How a row of the table samples: ``teacher`` (multi-step CFG) or ``few_step`` (no CFG)."""

    kind: str
    steps: int
    guidance: float = 1.0
    shift: float = 1.0
    t_min: float = 0.001
    mode: str = "ode"
    """``few_step``: the student's sampler, ``ode`` (Euler) or ``sde`` (fresh noise between steps, the sampler a
    student trained with ``dmd.backward_simulation sde`` is trained on; its run's ``dmd.sampler``)."""

    @property
    def nfe(self) -> int:
        """Network evaluations per image (CFG doubles them)."""
        return self.steps * (2 if self.kind == "teacher" and self.guidance != 1.0 else 1)

    def __call__(self, fn: PredictFn, noise: Tensor, cond: Conditioning, uncond: Conditioning, param,
                 generator: torch.Generator | None = None) -> Tensor:
        if self.kind == "teacher":
            return teacher_sample(fn, noise, cond, uncond, param, self.guidance, num_steps=self.steps,
                                  shift=self.shift)
        timesteps = few_step_timesteps(self.steps, self.shift, self.t_min)
        with torch.no_grad():
            return few_step_sample(fn, noise, cond, timesteps, param, mode=self.mode, generator=generator)


SDE_NOISE_OFFSET = 1_000_003
"""An sde sampler's fresh noise for seed ``s`` comes from ``torch.Generator().manual_seed(SDE_NOISE_OFFSET + s)``,
one stream per seed (the same for every sde model), apart from the starting noise of :func:`noise_for`."""


def noise_for(seed: int, n: int, shape: tuple[int, ...]) -> Tensor:
    """The fixed noise of ``seed`` (one draw per prompt, the same for every model)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(backbone: Backbone, fn: PredictFn, sampler: Sampler, prompts: list[str], seed: int,
                  resolution: int, batch_size: int = 64) -> tuple[Tensor, float]:
    """Images in ``[0, 1]`` for ``prompts`` with the noise of ``seed``; returns ``(images, seconds)``."""
    noise = noise_for(seed, len(prompts), backbone.latent_shape(resolution))
    fresh = torch.Generator().manual_seed(SDE_NOISE_OFFSET + seed)  # an sde sampler's between-step noise
    negative = backbone.text_encoder.negative()
    images, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        cond = backbone.text_encoder.encode(chunk)
        latents = sampler(fn, noise[i:i + len(chunk)], cond, repeat_conditioning(negative, len(chunk)),
                          backbone.parameterization, generator=fresh)
        images.append(backbone.codec.decode(latents).float().clamp(0, 1))
    return torch.cat(images), time.perf_counter() - start


def score_images(images: Tensor, prompts: list[str], reward: ShapesReward | None = None) -> dict[str, float]:
    """ShapeEval accuracies, fidelity and the reward's mean for one set of images."""
    out = summarize(evaluate(images, prompts))
    out["reward"] = float((reward or ShapesReward())(images, prompts).mean())
    return out


def mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: mean and (sample) std over the rows (the seeds)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        mean = sum(values) / len(values) if values else float("nan")
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": math.sqrt(var)}
    return out


def seed_spread(a: dict, b: dict, key: str = "overall") -> float:
    """The seed noise of the gap between two rows' means of ``key``: ``sqrt(std_a^2 + std_b^2)``, their spreads
    over seeds combined. A gap inside it is not called a win, whichever way it points (the demo report and
    Tables 4 and 5 use this one rule)."""
    return math.hypot(a["scores"][key]["std"], b["scores"][key]["std"])


def evaluate_model(backbone: Backbone, fn: PredictFn, sampler: Sampler, prompts: list[str], seeds: list[int],
                   resolution: int) -> dict:
    """One table row: per-seed scores, their mean/std, NFE and wall time."""
    per_seed, wall = [], 0.0
    for seed in seeds:
        images, seconds = sample_images(backbone, fn, sampler, prompts, seed, resolution)
        wall += seconds
        per_seed.append(score_images(images, prompts))
    return {"nfe": sampler.nfe, "sampler": sampler.__dict__, "per_seed": per_seed, "scores": mean_std(per_seed),
            "wall_s": wall, "images": len(prompts) * len(seeds)}


__all__ = ["ATTRIBUTES", "Sampler", "heldout_prompts", "noise_for", "sample_images", "score_images", "mean_std",
           "evaluate_model"]
