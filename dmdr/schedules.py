"""Schedules as pure functions of the step: the few-step timesteps, DynaDG and DynaRS.

``k`` (``step``) always counts *generator* steps (ALGORITHM.md). Nothing here keeps state: a
resumed run recomputes every value from the restored step counter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmdr.parameterization import Parameterization


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """The SD3 resolution shift ``t <- s t / (1 + (s - 1) t)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def few_step_timesteps(num_steps: int, shift: float = 1.0, t_min: float = 0.001) -> Tensor:
    """The generator's few-step levels: ``num_steps + 1`` values from 1 down to ``t_min``.

    ``linspace(1, t_min, N + 1)``, shifted, with the last entry forced to ``t_min`` (float32).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, t_min, num_steps + 1, dtype=torch.float64)
    t = shift_timesteps(t, shift)
    t[-1] = t_min
    return t.to(torch.float32)


def generator_levels(num_steps: int, shift: float, t_min: float, model_timesteps: tuple[float, ...] | list[float] = (),
                     param: Parameterization | None = None) -> Tensor:
    """The generator's ``num_steps + 1`` levels (float32), ending at ``t_min``.

    Without ``model_timesteps``: :func:`few_step_timesteps`. With them (a family's fixed schedule in the
    network's own units, e.g. SDXL's integer ``999, 749, 499, 249``, or ``399`` for its one-step
    generator): ``param.level`` of each, then ``t_min``. The sampler never calls the network at the last
    level (it returns the clean estimate there), so for epsilon models it only closes the list.
    """
    if not model_timesteps:
        return few_step_timesteps(num_steps, shift, t_min)
    if param is None:
        raise ValueError("explicit model timesteps need the parameterization that maps them to levels")
    if len(model_timesteps) != num_steps:
        raise ValueError(f"{len(model_timesteps)} model timesteps for {num_steps} steps")
    levels = [param.level(ts) for ts in model_timesteps] + [t_min]
    if any(not t_min < lv <= 1.0 for lv in levels[:-1]) or any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"model timesteps {list(model_timesteps)} must decrease and map into (t_min, 1]")
    return torch.tensor(levels, dtype=torch.float32)


COLD_START_SCHEDULES = ("cosine", "constant")
"""How DynaDG and DynaRS change over the cold start: ``cosine`` (the paper's dynamic strategies) or
``constant`` (the paper's "-Dynamic" ablation: the step-0 values, a fixed real-score LoRA scale and biased
renoise levels, for the whole run)."""


def critic_steps_per_generator_step(ratio: int, dmd_weight: float) -> int:
    """``dmd.ratio`` critic steps per generator step; none when nothing reads the critic (``dmd.weight 0``: the RL
    loss alone, the paper's "only RL" rows)."""
    return ratio if dmd_weight > 0 else 0


def iterations_per_generator_step(ratio: int, dmd_weight: float) -> int:
    """Iterations (one backward simulation each) per generator step: one per critic step, one without a critic."""
    return max(1, critic_steps_per_generator_step(ratio, dmd_weight))


def cosine_decay(step: int, decay_steps: int, schedule: str = "cosine") -> float:
    """``1/2 (1 + cos(pi min(step / D, 1)))``: 1 at step 0, 0 from step ``D`` on; always 1 for ``constant``."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"cold-start schedule {schedule!r}: choose one of {', '.join(COLD_START_SCHEDULES)}")
    if decay_steps <= 0:
        return 0.0
    frac = min(max(step, 0) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def dynadg_real_scale(step: int, s0: float, decay_steps: int, schedule: str = "cosine") -> float:
    """DynaDG: the critic-LoRA scale of the real score, ``s_r(k) = s0 c(k)``, exactly 0 from ``D`` on (cosine)."""
    if schedule == "cosine" and step >= decay_steps:
        return 0.0
    return s0 * cosine_decay(step, decay_steps, schedule)


def dynars_beta(step: int, alpha: float, beta: float, decay_steps: int,
                schedule: str = "cosine", end: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """DynaRS: the Beta parameters ``(alpha_k, beta_k)`` at generator step ``step``.

    ``alpha_k = a_end + (alpha - a_end) c(k)``, ``beta_k = b_end + (beta - b_end) c(k)``: the biased
    Beta(alpha, beta) at step 0, Beta(a_end, b_end) from step ``D`` on (``constant``: Beta(alpha, beta)
    throughout). The paper's ``end`` is (1, 1), the uniform distribution.
    """
    c = cosine_decay(step, decay_steps, schedule)
    return end[0] + (alpha - end[0]) * c, end[1] + (beta - end[1]) * c


def beta_mean(a: float, b: float) -> float:
    return a / (a + b)


class DynaRSSampler:
    """Draws renoise levels ``t ~ Beta(alpha_k, beta_k)`` clipped to ``[t_min, 1)``.

    With ``enabled=False`` it draws from the uniform distribution at every step (vanilla DMD).
    Sampling goes through a ``torch.Generator`` so a resumed run draws the same levels.
    """

    def __init__(self, alpha: float = 4.0, beta: float = 1.5, decay_steps: int = 2000,
                 t_min: float = 0.001, enabled: bool = True, schedule: str = "cosine",
                 end: tuple[float, float] = (1.0, 1.0)):
        if min(alpha, beta, *end) <= 0:
            raise ValueError(f"DynaRS Beta parameters must be > 0, got {alpha}, {beta} and end {end}")
        cosine_decay(0, decay_steps, schedule)  # an unknown schedule fails here, not at the first step
        self.alpha, self.beta, self.decay_steps, self.schedule = alpha, beta, decay_steps, schedule
        self.t_min, self.enabled, self.end = t_min, enabled, tuple(end)

    def params(self, step: int) -> tuple[float, float]:
        if not self.enabled:
            return 1.0, 1.0
        return dynars_beta(step, self.alpha, self.beta, self.decay_steps, self.schedule, self.end)

    def mean(self, step: int) -> float:
        return beta_mean(*self.params(step))

    def sample(self, step: int, n: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Tensor:
        """``n`` levels in ``[t_min, 1)`` as float32 on ``device``."""
        a, b = self.params(step)
        return beta_levels(a, b, n, generator, self.t_min, device)


def beta_levels(a: float, b: float, n: int, generator: torch.Generator | None = None, t_min: float = 0.001,
                device: torch.device | str = "cpu") -> Tensor:
    """``n`` levels ``t ~ Beta(a, b)`` clipped to ``[t_min, 1)``, float32 on ``device``.

    The draw happens on the generator's device (a random op must run where its generator lives: a CUDA
    generator refuses a CPU op), then moves to ``device``.
    """
    # Beta via two Gammas drawn from our generator (torch.distributions has no generator arg).
    draw_on = generator.device if generator is not None else torch.device(device)
    ga = torch._standard_gamma(torch.full((n,), a, dtype=torch.float64, device=draw_on), generator=generator)
    gb = torch._standard_gamma(torch.full((n,), b, dtype=torch.float64, device=draw_on), generator=generator)
    t = ga / (ga + gb)
    upper = math.nextafter(1.0, 0.0)
    return t.clamp(t_min, upper).to(device=device, dtype=torch.float32)
