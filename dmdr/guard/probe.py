"""The health probe: the student's few-step samples of fixed held-out prompts and fixed noise, scored with
signals that exist for real models (:mod:`dmdr.guard.signals`, the configured rewards, the critic's
denoising loss relative to the teacher's on the same samples, and the CLIP / aesthetic / LPIPS models of
:mod:`dmdr.guard.scorers` where configured).

Seed diversity is measured in pixels (``probe/diversity``) and in the VAE's latent space
(``probe/diversity_latent``: the student's latents, which is where the VAE encoder maps images, up to its
reconstruction error): a feature distance every latent model has without downloading anything. It is coarser
than LPIPS (``--guard.lpips_weights``, whose ImageNet trunk must be fetched once by the user) or CLIP
(``--guard.clip_model``), which the probe adds when given local weights.

The prompts, the noise and the renoising levels are the same at every probe (their own generators,
seeded by constants), so the numbers of two probes are comparable, a resumed run probes exactly as the
uninterrupted one, and the training RNG streams are never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dmdr.guard.signals import image_signals, nonfinite_count, seed_diversity
from dmdr.losses.dmd import critic_loss
from dmdr.models.base import conditioning_to
from dmdr.sampling import few_step_sample

PROBE_SEED = 20_251_207
"""Noise of seed ``i`` of the probe: ``PROBE_SEED + i``; renoising noise and levels: ``PROBE_SEED - 1``."""


def _conditioning(trainer: Any, prompts: list[str]) -> Any:
    if trainer.backbone.text_encoder is not None:
        return conditioning_to(trainer.backbone.text_encoder.encode(prompts), trainer.device)
    return conditioning_to(trainer.backbone.extras["sample_cond"], trainer.device)


def _tile(cond: Any, times: int) -> Any:
    """A batch-P conditioning for the P prompts of each of ``times`` seeds (seed-major, as the samples)."""
    return {k: torch.cat([v] * times) for k, v in cond.items()}


@torch.no_grad()
def run_probe(trainer: Any, prompts: list[str], seeds: int, scorers: Any = None) -> tuple[dict[str, float], Tensor]:
    """Sample ``prompts`` x ``seeds`` with the student and score them; returns (signals, images seed-major).

    Collective under FSDP2 (every rank runs the same forwards); every rank gets the same numbers.

    Args:
        scorers: the configured :class:`~dmdr.guard.scorers.ProbeScorers`, or None.
    """
    cfg, engine = trainer.cfg, trainer.engine
    cond = _conditioning(trainer, prompts)
    shape = (len(prompts), *trainer.backbone.latent_shape(cfg.model.resolution))
    latents, images = [], []
    for s in range(seeds):
        g = torch.Generator(device=trainer.device).manual_seed(PROBE_SEED + s)
        noise = torch.randn(shape, generator=g, device=trainer.device)
        with trainer.autocast():
            x0 = few_step_sample(trainer.roles.generator_fn, noise, cond, engine.timesteps, engine.param,
                                 mode=cfg.dmd.sampler, generator=g)
            latents.append(x0.float())
            images.append(trainer.backbone.codec.decode(x0).float())
    x0 = torch.cat(latents)
    pics = torch.cat(images)
    all_prompts = list(prompts) * seeds
    signals = image_signals(pics, seeds)
    signals["probe/nonfinite"] += nonfinite_count(x0)
    signals["probe/diversity_latent"] = seed_diversity(torch.nan_to_num(x0), seeds)
    shown = torch.nan_to_num(pics, nan=0.0).clamp(0, 1)
    if scorers is not None:
        signals.update(scorers.signals(shown, all_prompts, seeds))
    if engine.rewards:
        total = 0.0
        for reward, weight in engine.rewards:
            value = reward(shown, all_prompts).float().mean().item()
            signals[f"probe/reward/{reward.name}"] = value
            total += weight * value
        signals["probe/reward"] = total
    signals.update(_critic_vs_teacher(trainer, torch.nan_to_num(x0), _tile(cond, seeds)))
    return signals, pics


def _critic_vs_teacher(trainer: Any, x0: Tensor, cond: Any) -> dict[str, float]:
    """The fake score's (critic) and the real score's (teacher) denoising losses on the same renoised samples.

    The critic tracks the student's distribution, the teacher the data's: when the student leaves what the
    teacher models, the teacher's loss on its samples grows while the critic's does not (the ratio falls).
    """
    g = torch.Generator(device=trainer.device).manual_seed(PROBE_SEED - 1)
    noise = torch.randn(x0.shape, generator=g, device=trainer.device)
    t = torch.linspace(0.1, 0.9, x0.shape[0], device=trainer.device)
    x = trainer.engine.param.renoise(x0, noise, t)
    target = trainer.engine.param.target(x0, noise)
    with trainer.autocast():
        critic = critic_loss(trainer.roles.critic_fn(x, t, cond, trainer.cfg.dmd.fake_scale), target).float().item()
        teacher = critic_loss(trainer.roles.critic_fn(x, t, cond, 0.0), target).float().item()
    return {"probe/critic_loss": critic, "probe/teacher_loss": teacher,
            "probe/critic_teacher_ratio": critic / teacher if teacher > 0 else 1.0}
