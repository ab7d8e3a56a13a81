"""The one place that converts between noisy samples, clean estimates and model targets.

Convention (ALGORITHM.md): ``t in [0, 1]``, ``t = 1`` is pure noise. Every other module asks a
:class:`Parameterization` to renoise, to turn a prediction into a clean estimate, to give the
regression target, or to take a deterministic sampler step; none does this arithmetic itself.

Two parameterizations exist:

* :class:`FlowMatching` (SD3, SD3.5, Z-Image): ``x_t = (1 - t) x0 + t eps``, the model predicts the
  velocity ``v = eps - x0``, and the clean estimate is the Euler step to ``t_min``:
  ``x0_hat = x_t + (t_min - t) v_hat``.
* :class:`EpsilonPrediction` (SDXL-style UNets): ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` with
  ``ab = alphas_cumprod`` at ``t (T - 1)`` (interpolated, or at the nearest integer timestep with
  ``discrete=True``, as the SDXL UNet was trained); the model predicts ``eps`` and
  ``x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)``.

Both map the network's own timestep units back to ``t`` (:meth:`Parameterization.level`), so a recipe can
give a family's fixed few-step timesteps (SDXL's integer ``999, 749, 499, 249``) in the units users know.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

TimeLike = float | Tensor


def expand_like(t: TimeLike, x: Tensor) -> Tensor | float:
    """Broadcast a per-sample time (or scale) of shape ``(B,)`` against ``x`` of shape ``(B, ...)``.

    A Python float passes through unchanged; a 0-d tensor broadcasts as is.
    """
    if not isinstance(t, Tensor):
        return t
    if t.ndim == 0:
        return t.to(dtype=x.dtype) if t.is_floating_point() else t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"per-sample tensor of shape {tuple(t.shape)} does not match batch {tuple(x.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@runtime_checkable
class Parameterization(Protocol):
    """What the trainer, samplers and losses need to know about a model's prediction type."""

    t_min: float

    def renoise(self, x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        """Forward process: the noisy sample at level ``t``."""

    def to_x0(self, x_t: Tensor, t: TimeLike, pred: Tensor) -> Tensor:
        """Clean estimate from a model prediction at level ``t``."""

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """Regression target of the denoising loss (what the model should predict)."""

    def step(self, x_t: Tensor, t: TimeLike, t_next: TimeLike, pred: Tensor) -> Tensor:
        """Deterministic sampler step from ``t`` to ``t_next`` (Euler for flows, DDIM for eps)."""

    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep value the network is called with."""

    def level(self, model_timestep: float) -> float:
        """The level ``t`` whose network call uses ``model_timestep`` (the inverse of :meth:`model_timestep`)."""


class FlowMatching:
    """Rectified-flow / flow-matching parameterization with velocity prediction.

    Args:
        t_min: the level the clean estimate steps to (*default* 0.001 for the SD3 family).
        timestep_scale: networks are called with ``timestep_scale * t`` (1000 for diffusers models).
    """

    def __init__(self, t_min: float = 0.001, timestep_scale: float = 1000.0):
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        self.t_min = float(t_min)
        self.timestep_scale = float(timestep_scale)

    def renoise(self, x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        t = expand_like(t, x0)
        return (1 - t) * x0 + t * noise

    def to_x0(self, x_t: Tensor, t: TimeLike, pred: Tensor) -> Tensor:
        t = expand_like(t, x_t)
        return x_t + (self.t_min - t) * pred

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def step(self, x_t: Tensor, t: TimeLike, t_next: TimeLike, pred: Tensor) -> Tensor:
        dt = expand_like(t_next, x_t) - expand_like(t, x_t)
        return x_t + dt * pred

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.timestep_scale

    def level(self, model_timestep: float) -> float:
        return float(model_timestep) / self.timestep_scale

    def __repr__(self) -> str:
        return f"FlowMatching(t_min={self.t_min})"


class EpsilonPrediction:
    """Epsilon-prediction (DDPM-style) parameterization on a discrete ``alphas_cumprod`` table.

    A continuous ``t in [0, 1]`` maps to the fractional index ``t (T - 1)``; ``alphas_cumprod`` is
    interpolated linearly there, and the network is called with that fractional index.

    Args:
        alphas_cumprod: the scheduler's ``(T,)`` table (``T = num_train_timesteps``).
        t_min: the lowest level the critic and renoise draws reach (DynaRS clips there).
        discrete: snap ``t (T - 1)`` to the nearest integer timestep for the table lookup and the network
            call (SDXL's UNet only saw integer timesteps). Renoise, clean estimate and sampler step then use
            exactly the scheduler's ``alphas_cumprod[k]``, so a float32 ``t = k / (T - 1)`` gives the same
            numbers as diffusers' integer-timestep schedulers.
    """

    def __init__(self, alphas_cumprod: Tensor, t_min: float = 0.0, discrete: bool = False):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.numel() < 2 or not torch.all((ab > 0) & (ab <= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1]")
        self.alphas_cumprod = ab
        self.t_min = float(t_min)
        self.discrete = bool(discrete)
        self._tables: dict[torch.device, Tensor] = {ab.device: ab}

    def _table(self, device: torch.device) -> Tensor:
        """``alphas_cumprod`` on ``device`` (copied once per device, not once per call)."""
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t: TimeLike, like: Tensor) -> Tensor:
        """``alphas_cumprod`` at continuous level ``t``, shaped to broadcast against ``like``."""
        # A tensor level is looked up where it lives (no host round trip, a sync on GPUs); a float on the host.
        device = t.device if isinstance(t, Tensor) else torch.device("cpu")
        t = torch.as_tensor(t, dtype=torch.float64, device=device).clamp(0, 1)
        pos = t * (self.num_train_timesteps - 1)
        if self.discrete:
            pos = pos.round()
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = pos - lo
        table = self._table(device)
        ab = table[lo] * (1 - frac) + table[lo + 1] * frac
        ab = ab.to(device=like.device, dtype=torch.float32 if like.dtype != torch.float64 else torch.float64)
        return expand_like(ab, like) if ab.ndim else ab

    def renoise(self, x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def to_x0(self, x_t: Tensor, t: TimeLike, pred: Tensor) -> Tensor:
        ab = self.alpha_bar(t, x_t)
        return (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise

    def step(self, x_t: Tensor, t: TimeLike, t_next: TimeLike, pred: Tensor) -> Tensor:
        # DDIM (eta = 0): keep the predicted noise, move the clean estimate to the next level.
        return self.renoise(self.to_x0(x_t, t, pred), pred, t_next)

    def model_timestep(self, t: Tensor) -> Tensor:
        pos = t * (self.num_train_timesteps - 1)
        return pos.round() if self.discrete else pos

    def level(self, model_timestep: float) -> float:
        return float(model_timestep) / (self.num_train_timesteps - 1)

    def __repr__(self) -> str:
        return (f"EpsilonPrediction(T={self.num_train_timesteps}, t_min={self.t_min}"
                f"{', discrete' if self.discrete else ''})")


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: TimeLike) -> Tensor:
    """``uncond + w (cond - uncond)``; ``w`` a float or a per-sample tensor."""
    return uncond + expand_like(scale, cond) * (cond - uncond)
