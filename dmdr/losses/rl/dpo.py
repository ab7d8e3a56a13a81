"""On-policy DPO at the few-step levels (ALGORITHM.md, RL branch, DPO; PSO-style).

Per prompt, ``K >= 2`` samples from the generator's own N-step sampler (no grad, different noise) are
scored; the best ``w`` and worst ``l`` form the pair. One few-step level ``t`` and one noise ``eps`` are
shared by the pair (``x_t^w``, ``x_t^l``), and with the clean-estimate error
``e(x) = mean_{C,H,W} (to_x0(x_t, t, G(x_t, t)) - x)^2``::

    L_dpo = -log sigmoid(-beta [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])

against the frozen reference (the generator at the RL start, :mod:`dmdr.losses.rl.reference`).
Pairs are drawn fresh every generator step (on-policy): offline pairs break few-step ability.

Cost per generator step (B prompts, N steps): ``N`` no-grad forwards of ``K B`` samples, one forward of
``2 B`` with grad and one no-grad reference forward of ``2 B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.losses.rl.base import PolicyAccess, RLBatch, poison_if, repeat_index, score
from dmdr.parameterization import Parameterization
from dmdr.rewards.base import Reward
from dmdr.sampling import few_step_sample, randn_like


def clean_estimate_error(param: Parameterization, x_t: Tensor, t: Tensor, pred: Tensor, x: Tensor) -> Tensor:
    """``e = mean_{C,H,W} (to_x0(x_t, t, pred) - x)^2`` per sample, fp32."""
    err = (param.to_x0(x_t.float(), t, pred.float()) - x.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def dpo_loss(e_w: Tensor, e_ref_w: Tensor, e_l: Tensor, e_ref_l: Tensor, beta: float) -> Tensor:
    """``mean -log sigmoid(-beta [(e_w - e_ref_w) - (e_l - e_ref_l)])`` over the pairs."""
    return -F.logsigmoid(-beta * ((e_w - e_ref_w) - (e_l - e_ref_l))).mean()


class OnPolicyDPO:
    """The DPO branch.

    Args:
        k: samples per prompt ``K`` (``rl.dpo_k``, >= 2).
        beta: ``beta`` (``rl.dpo_beta``).
        weight: ``lambda`` in ``L = L_dmd + lambda L_dpo`` (``rl.dpo_weight``).
        sampler: the generator's sampler for the candidates (``dmd.backward_simulation``).
    """

    name = "dpo"
    needs_reference = True
    stateful = False

    def __init__(self, k: int = 4, beta: float = 100.0, weight: float = 1.0,
                 sampler: Literal["ode", "sde"] = "ode"):
        if k < 2:
            raise ValueError(f"DPO needs K >= 2 samples per prompt, got {k}")
        self.k, self.beta, self.weight, self.sampler = int(k), float(beta), float(weight), sampler

    def prepare(self, prompts: list[str], cond: Any, generator: PolicyAccess,
                rewards: Sequence[tuple[Reward, float]]) -> tuple[dict[str, Any], dict[str, float]]:
        """The step's pairs for the whole batch (no grad): ``K`` candidates per prompt, scored; best and worst;
        one level and one noise per pair. Drawn before any slice's loss, so accumulation draws what one batch
        draws."""
        g, param = generator, generator.param
        if g.reference_fn is None:
            raise ValueError("DPO needs the frozen reference (PolicyAccess.reference_fn)")
        n, k = len(prompts), self.k
        device = g.timesteps.device
        rep = repeat_index(n, k, device)
        cond_k = g.select(cond, rep)
        prompts_k = [p for p in prompts for _ in range(k)]  # = prompts[rep], without a device sync
        with torch.no_grad():
            samples = few_step_sample(g.fn, g.noise(n * k), cond_k, g.timesteps, param, mode=self.sampler,
                                      generator=g.rng)
        scores, stats, finite = score(rewards, g.decode(samples), prompts_k)
        grid = scores.view(n, k)
        best, worst = grid.argmax(dim=1), grid.argmin(dim=1)
        base = torch.arange(n, device=device) * k
        x_w, x_l = samples[base + best.to(device)], samples[base + worst.to(device)]
        # one few-step level and one noise per pair, shared by w and l
        levels = g.timesteps.numel() - 1
        idx = torch.randint(0, levels, (n,), generator=g.rng, device=g.rng.device).to(device)
        t = g.timesteps.to(device)[idx]
        eps = randn_like(x_w, g.rng)
        stats["rl/dpo_reward_gap"] = (grid.max(dim=1).values - grid.min(dim=1).values).mean().item()
        return {"x_w": x_w, "x_l": x_l, "t": t, "eps": eps, "finite": finite}, stats

    def micro_loss(self, pairs: dict[str, Any], batch: RLBatch, generator: PolicyAccess,
                   rewards: Sequence[tuple[Reward, float]], rows: slice) -> tuple[Tensor, dict[str, float]]:
        """The DPO loss (mean over pairs) of the pairs ``rows``, whose prompts and conditioning ``batch`` holds."""
        g, param = generator, generator.param
        x_w, x_l, t, eps = (pairs[key][rows] for key in ("x_w", "x_l", "t", "eps"))
        x_t = torch.cat([param.renoise(x_w, eps, t), param.renoise(x_l, eps, t)])
        t2, cond2, x2 = torch.cat([t, t]), g.cat([batch.cond, batch.cond]), torch.cat([x_w, x_l])
        e = clean_estimate_error(param, x_t, t2, g.fn(x_t, t2, cond2), x2)
        e_ref = clean_estimate_error(param, x_t, t2, g.reference_fn(x_t, t2, cond2), x2)
        e_w, e_l = e.chunk(2)
        e_ref_w, e_ref_l = e_ref.chunk(2)
        loss = dpo_loss(e_w, e_ref_w, e_l, e_ref_l, self.beta)
        with torch.no_grad():
            margin = -((e_w - e_ref_w) - (e_l - e_ref_l))
            stats = {"rl/dpo_loss": loss.item(), "rl/dpo_accuracy": (margin > 0).float().mean().item()}
        return poison_if(self.weight * loss, not pairs["finite"]), stats

    def loss(self, batch: RLBatch, generator: PolicyAccess,
             rewards: Sequence[tuple[Reward, float]]) -> tuple[Tensor, dict[str, float]]:
        pairs, stats = self.prepare(batch.prompts, batch.cond, generator, rewards)
        loss, micro = self.micro_loss(pairs, batch, generator, rewards, slice(0, len(batch.prompts)))
        return loss, {**stats, **micro}
