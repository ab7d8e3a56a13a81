"""GRPO on the few-step generator, with the DMD loss in place of Flow-GRPO's KL term (ALGORITHM.md, GRPO).

Per group, ``G`` samples of one prompt are drawn with the *sde* sampler, a Gaussian policy per step
(``x_{i+1} ~ N(renoise(x0_theta(x_i, t_i), 0, t_{i+1}), s(t_{i+1})^2 I)``), keeping each step's log-prob at
sampling time (:func:`dmdr.sampling.sde_sample_with_log_probs`). Advantages are group-normalised,
``A = (r - mean_group) / (std_group + 1e-4)``, and per stochastic step::

    rho = exp(log p_theta - log p_old),   L = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)

averaged over the ``N - 1`` stochastic steps (the last step is deterministic). ``L = L_dmd + lambda L``.

With DMD the KL term of Flow-GRPO is dropped: the DMD loss regularises instead. ``kl_weight = beta > 0`` adds it
back, ``L = -mean min(...) + beta KL(pi_theta || pi_ref)`` per stochastic step (:func:`~dmdr.sampling.sde_step_kl`,
against a frozen reference: the generator at the RL start), for GRPO *without* DMD (``--dmd.weight 0``): the
paper's "only RL" row with the regulariser the method originally had.

Groups live on one rank: the per-rank batch of ``B`` prompts contributes its first ``B / G`` prompts, each
repeated ``G`` times, so every rank samples and trains exactly ``B`` trajectories and runs the same
number of forwards (FSDP2 collectives never wait on a rank with another group count).

Several inner updates per group (``inner_updates = mu``): a group is drawn at one generator step and
reused for the next ``mu - 1`` ones (each also takes its own DMD loss), so from the second update on
the ratio moves away from 1 and the clip acts. That group is the sampler state: :meth:`GRPO.state_dict`
goes into the checkpoint (per rank) so a resumed run reuses the same group.

Cost per generator step (B trajectories, N steps): ``N`` no-grad forwards of ``B`` samples once per
group, and one forward of ``(N - 1) B`` with grad (all stochastic steps in one batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dmdr.losses.rl.base import PolicyAccess, RLBatch, poison_if, repeat_index, score
from dmdr.rewards.base import Reward
from dmdr.sampling import sde_sample_with_log_probs, sde_step_kl, sde_step_log_prob


def group_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """``(r - mean_group) / (std_group + eps)`` with the population std, groups of consecutive samples."""
    grid = scores.float().view(-1, group_size)
    adv = (grid - grid.mean(dim=1, keepdim=True)) / (grid.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """``-mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho = exp(log_prob - old_log_prob)``.

    ``log_prob`` / ``old_log_prob``: ``(B, S)`` per step; ``advantages``: ``(B,)``.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    adv = advantages.unsqueeze(1)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


class GRPO:
    """The GRPO branch.

    Args:
        group_size: ``G`` samples per prompt (``rl.grpo_group_size``, >= 2; divides the per-rank batch).
        clip: ``eps`` of the clipped ratio (``rl.grpo_clip``, *default* 1e-3, Flow-GRPO's).
        weight: ``lambda`` in ``L = L_dmd + lambda L_grpo`` (``rl.grpo_weight``).
        inner_updates: generator updates per group ``mu`` (``rl.grpo_inner_updates``).
        adv_eps: the ``1e-4`` of the advantage's denominator.
        kl_weight: ``beta`` of Flow-GRPO's KL term against the reference (``rl.grpo_kl_weight``; 0: none, DMD
            regularises).
    """

    name = "grpo"
    stateful = True

    def __init__(self, group_size: int = 4, clip: float = 1e-3, weight: float = 1.0, inner_updates: int = 1,
                 adv_eps: float = 1e-4, kl_weight: float = 0.0):
        if group_size < 2:
            raise ValueError(f"GRPO needs groups of >= 2 samples, got {group_size}")
        if inner_updates < 1:
            raise ValueError(f"GRPO inner_updates must be >= 1, got {inner_updates}")
        self.group_size, self.clip, self.weight = int(group_size), float(clip), float(weight)
        self.inner_updates, self.adv_eps = int(inner_updates), float(adv_eps)
        if kl_weight < 0:
            raise ValueError(f"GRPO kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)
        self.needs_reference = self.kl_weight > 0
        self.group: dict[str, Any] | None = None
        """The current group (states, old log-probs, advantages, conditioning, uses left), or None."""
        self.last_advantages: Tensor | None = None

    # -- sampler state (per rank) --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"group": self.group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.group = state["group"]

    def _draw_group(self, prompts: list[str], cond: Any, g: PolicyAccess,
                    rewards: Sequence[tuple[Reward, float]]) -> dict:
        n = len(prompts)
        if n % self.group_size:
            raise ValueError(f"GRPO: a batch of {n} prompts is not divisible by the group size {self.group_size}")
        groups = n // self.group_size
        rep = repeat_index(groups, self.group_size, g.timesteps.device)
        cond = g.select(cond, rep)
        prompts = [p for p in prompts[:groups] for _ in range(self.group_size)]  # = prompts[rep], no sync
        with torch.no_grad():
            traj = sde_sample_with_log_probs(g.fn, g.noise(n), cond, g.timesteps, g.param, generator=g.rng)
        scores, stats, finite = score(rewards, g.decode(traj.sample), prompts)
        return {"states": [s.detach() for s in traj.states], "old_log_probs": traj.log_probs.detach(),
                "advantages": group_advantages(scores, self.group_size, self.adv_eps), "cond": cond,
                "uses_left": self.inner_updates, "stats": stats, "finite": finite}

    def prepare(self, prompts: list[str], cond: Any, generator: PolicyAccess,
                rewards: Sequence[tuple[Reward, float]]) -> tuple[dict[str, Any], dict[str, float]]:
        """This step's group (drawn for the whole batch, or the one still in use), its uses counted."""
        if generator.timesteps.numel() - 2 < 1:
            raise ValueError("GRPO needs dmd.num_steps >= 2 (a 1-step sampler has no stochastic step)")
        if self.group is None or self.group["uses_left"] <= 0:
            self.group = self._draw_group(prompts, cond, generator, rewards)
        group = self.group
        group["uses_left"] -= 1
        self.last_advantages = group["advantages"]
        if not group["finite"]:  # a group scored non-finite is skipped once, then redrawn
            self.group = None
        return group, dict(group["stats"])

    def micro_loss(self, group: dict[str, Any], batch: RLBatch, generator: PolicyAccess,
                   rewards: Sequence[tuple[Reward, float]], rows: slice) -> tuple[Tensor, dict[str, float]]:
        """The clipped policy loss (mean over trajectories and stochastic steps) of the trajectories ``rows``."""
        g, param = generator, generator.param
        steps = g.timesteps.numel() - 2  # stochastic steps: all but the last
        states = [s[rows] for s in group["states"]]
        n = states[0].shape[0]
        device = states[0].device
        index = torch.arange(rows.start, rows.stop, device=device)
        x = torch.cat(states[:steps])
        x_next = torch.cat(states[1:steps + 1])
        t = torch.cat([g.timesteps[i].to(device).expand(n) for i in range(steps)])
        t_next = torch.cat([g.timesteps[i + 1].to(device).expand(n) for i in range(steps)])
        cond = g.cat([g.select(group["cond"], index)] * steps)
        old_log_probs, advantages = group["old_log_probs"][rows], group["advantages"][rows]
        x0_hat = param.to_x0(x, t, g.fn(x, t, cond))  # every stochastic step in one forward, with grad
        log_prob = sde_step_log_prob(param, x_next, x0_hat, t_next).view(steps, n).t()
        loss = clipped_policy_loss(log_prob, old_log_probs, advantages, self.clip)
        stats: dict[str, float] = {}
        if self.kl_weight > 0:
            with torch.no_grad():
                x0_ref = param.to_x0(x, t, g.reference_fn(x, t, cond))
            kl = sde_step_kl(param, x0_hat, x0_ref, t_next).mean()
            loss = loss + self.kl_weight * kl
            stats["rl/grpo_kl"] = kl.item()
        with torch.no_grad():
            ratio = torch.exp(log_prob - old_log_probs)
            stats.update({"rl/grpo_loss": loss.item(), "rl/grpo_ratio_dev": (ratio - 1).abs().mean().item(),
                          "rl/grpo_clipped": ((ratio - 1).abs() > self.clip).float().mean().item()})
        return poison_if(self.weight * loss, not group["finite"]), stats

    def loss(self, batch: RLBatch, generator: PolicyAccess,
             rewards: Sequence[tuple[Reward, float]]) -> tuple[Tensor, dict[str, float]]:
        group, stats = self.prepare(batch.prompts, batch.cond, generator, rewards)
        loss, micro = self.micro_loss(group, batch, generator, rewards, slice(0, group["states"][0].shape[0]))
        return loss, {**stats, **micro}
