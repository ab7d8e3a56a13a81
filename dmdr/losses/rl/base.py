"""One interface for every RL branch (ALGORITHM.md, RL branch): ``loss(batch, generator, rewards) -> (loss, stats)``.

The trainer (and the toy world) build two small objects per generator step and call one method:

* :class:`RLBatch`: what the step already has: the one-step clean estimate ``x0`` of the DMD loss
  (with grad; ReFL scores it), the prompts and their conditioning;
* :class:`PolicyAccess` (the ``generator`` argument): how to call the generator (with grad), its frozen
  reference (DPO), its few-step levels and parameterization, the run's noise stream and the decoder.

A method declares what it needs from its owner as attributes: ``needs_reference`` (a frozen
snapshot of the generator at the RL start, see :mod:`dmdr.losses.rl.reference`) and ``stateful``
(sampler state kept across generator steps, e.g. GRPO's group; then the method's ``state_dict`` /
``load_state_dict`` go into the checkpoint, per rank). Randomness comes only from ``PolicyAccess.rng``, so a
resumed run redraws the same samples. Under gradient accumulation the step engine calls ``prepare`` once on the
whole batch and ``micro_loss`` per slice: a DPO pair or a GRPO group is never split.

A reward that returns non-finite scores makes the method's loss NaN: the trainer's non-finite skip
path then skips the step on every rank and counts it (``train/skipped_steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dmdr.parameterization import Parameterization
from dmdr.rewards.base import Reward

GeneratorFn = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass
class RLBatch:
    """The generator step's inputs an RL method may use."""

    x0: Tensor
    """The one-step clean estimate of the DMD loss, with grad (ReFL's images come from it)."""
    prompts: list[str]
    cond: Any
    """The prompts' conditioning (batch-first, as the generator takes it)."""


@dataclass
class PolicyAccess:
    """How an RL method reaches the generator and the run's shared machinery."""

    fn: GeneratorFn
    """``G_theta(x_t, t, cond) -> prediction`` under the caller's grad mode."""
    param: Parameterization
    timesteps: Tensor
    """The ``N + 1`` few-step levels (:func:`~dmdr.schedules.few_step_timesteps`)."""
    rng: torch.Generator
    noise: Callable[[int], Tensor]
    """``noise(n)``: ``n`` fresh starting latents from :attr:`rng`."""
    decode: Callable[[Tensor], Tensor]
    """Latents -> what the rewards score (the frozen VAE's images in [0, 1]; the identity in the toy)."""
    select: Callable[[Any, Tensor], Any]
    """``select(cond, index)``: the conditioning of the samples ``index`` (a ``(M,)`` long tensor)."""
    cat: Callable[[list[Any]], Any]
    """Concatenate conditionings along the batch."""
    reference_fn: GeneratorFn | None = None
    """The frozen reference's prediction (no grad); set for methods with ``needs_reference``."""


@runtime_checkable
class RLMethod(Protocol):
    """An RL branch. ``name`` is its ``--rl.method`` value."""

    name: str
    needs_reference: bool
    stateful: bool

    def loss(self, batch: RLBatch, generator: PolicyAccess,
             rewards: Sequence[tuple[Reward, float]]) -> tuple[Tensor, dict[str, float]]: ...

    def prepare(self, prompts: list[str], cond: Any, generator: PolicyAccess,
                rewards: Sequence[tuple[Reward, float]]) -> tuple[Any, dict[str, float]]:
        """What the step draws for the whole per-rank batch, without grad (DPO's pairs, GRPO's group), and its
        stats; ``loss`` is ``prepare`` then :meth:`micro_loss` on every row."""
        ...

    def micro_loss(self, prepared: Any, batch: RLBatch, generator: PolicyAccess,
                   rewards: Sequence[tuple[Reward, float]], rows: slice) -> tuple[Tensor, dict[str, float]]:
        """The loss (a mean over its rows) of the slice ``rows`` of the step's batch, whose clean estimate, prompts
        and conditioning ``batch`` holds (gradient accumulation: :mod:`dmdr.micro_batches`)."""
        ...


def score(rewards: Sequence[tuple[Reward, float]], images: Tensor,
          prompts: list[str]) -> tuple[Tensor, dict[str, float], bool]:
    """``sum_r w_r r(images)`` per sample (no grad), per-reward stats, and whether every score is finite."""
    if not rewards:
        raise ValueError("an RL method needs at least one (reward, weight) pair")
    total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
    stats: dict[str, float] = {}
    finite = True
    with torch.no_grad():
        for reward, weight in rewards:
            s = reward(images, prompts).float()
            if s.ndim != 1 or s.shape[0] != images.shape[0]:
                raise ValueError(f"reward {reward.name!r} returned shape {tuple(s.shape)}, "
                                 f"expected ({images.shape[0]},)")
            finite = finite and bool(torch.isfinite(s).all())
            total = total + weight * s
            stats[f"reward/{reward.name}"] = s.mean().item()
            stats[f"reward/{reward.name}_std"] = s.std(unbiased=False).item() if s.numel() > 1 else 0.0
    return total, stats, finite


def poison_if(loss: Tensor, bad: bool) -> Tensor:
    """``loss`` made NaN (gradients too) when ``bad``: the trainer's non-finite path skips and counts it."""
    return loss * float("nan") if bad else loss


def repeat_index(n: int, times: int, device: torch.device | str) -> Tensor:
    """``[0]*times + [1]*times + ...``: each of ``n`` samples repeated ``times`` times, in place."""
    return torch.arange(n, device=device).repeat_interleave(times)
