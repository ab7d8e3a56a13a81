"""Pretraining of the shapes world's teacher: first the autoencoder, then text encoders + transformer.

Both stages train on fresh renders of training-split prompts (:func:`~dmdr.worlds.shapes.scene.sample_scenes`),
so there is no data set to store. The autoencoder learns to reconstruct renders (MSE plus a small KL
term); its latent mean and std set the VAE config's ``shift_factor`` / ``scaling_factor`` as SD3's do.
The teacher then learns the flow-matching velocity on those latents through the library's own
:class:`~dmdr.models.sd3.SD3Denoiser`, :class:`~dmdr.models.sd3.SD3TextEncoder` (with grad) and
:class:`~dmdr.parameterization.FlowMatching`, with logit-normal levels (SD3's training distribution),
10% empty prompts (for CFG) and an EMA of the weights, which is what gets saved.

``tools/pretrain_teacher.py`` is the command line; the committed ``assets/shapes-teacher`` was made by it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dmdr.models.sd3 import SD3Denoiser, SD3TextEncoder
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH, build_components
from dmdr.worlds.shapes.scene import render_batch, sample_scenes

log = logging.getLogger("dmdr")


@dataclass
class PretrainConfig:
    """The settings of :func:`pretrain` (the committed teacher's are the defaults)."""

    seed: int = 0
    vae_steps: int = 400
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    empty_prompt_prob: float = 0.1
    single_fraction: float = 0.3
    """Share of one-group prompts in the training stream (the rest are related pairs)."""
    log_every: int = 100


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def train_autoencoder(vae: nn.Module, cfg: PretrainConfig, generator: torch.Generator) -> dict[str, float]:
    """Fit the VAE to renders, then set its ``shift_factor`` / ``scaling_factor`` from the latent statistics."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, loss = time.time(), torch.tensor(0.0)
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(step, 50, cfg.vae_steps)
        images = render_batch(sample_scenes(cfg.vae_batch_size, generator, single_fraction=cfg.single_fraction),
                              generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - images).pow(2).mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log.info("autoencoder step %d/%d  loss %.5f  (%.0f s)", step, cfg.vae_steps, loss.item(),
                     time.time() - start)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images = render_batch(sample_scenes(256, generator, single_fraction=cfg.single_fraction), generator)
        z = vae.encode(images * 2 - 1).latent_dist.mode()
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
        recon = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    return {"vae_loss": loss.item(), "vae_recon_mse": float((recon - images).pow(2).mean()),
            "vae_shift_factor": float(vae.config.shift_factor), "vae_scaling_factor": float(vae.config.scaling_factor)}


def pretrain(cfg: PretrainConfig, on_eval=None, eval_every: int = 0) -> tuple[dict, dict]:
    """Train the world's teacher from scratch; returns ``(components, stats)``.

    ``components`` are the pipeline parts (EMA weights for the trained ones), ready for
    :func:`~dmdr.worlds.shapes.pipeline.save_pipeline`. ``on_eval(step, components)`` is called every
    ``eval_every`` teacher steps (0 = never) with the current EMA components.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    parts = build_components(cfg.seed)
    stats = train_autoencoder(parts["vae"], cfg, generator)
    codec = AutoencoderKLCodec(parts["vae"])

    encoders = [parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]]
    trained = nn.ModuleList([parts["transformer"], *encoders])
    ema = copy.deepcopy(trained).requires_grad_(False)
    trained.train()
    text = SD3TextEncoder(parts["tokenizer"], encoders[0], parts["tokenizer_2"], encoders[1], parts["tokenizer_3"],
                          encoders[2], max_sequence_length=MAX_SEQUENCE_LENGTH)
    denoiser = SD3Denoiser(parts["transformer"])
    param = denoiser.parameterization
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg.warmup, cfg.steps)
        scenes = sample_scenes(cfg.batch_size, generator, single_fraction=cfg.single_fraction)
        prompts = [s.prompt() for s in scenes]
        with torch.no_grad():
            x0 = codec.encode(render_batch(scenes, generator))
        drop = torch.rand(len(prompts), generator=generator) < cfg.empty_prompt_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        t = torch.sigmoid(torch.randn(len(prompts), generator=generator))  # SD3's logit-normal levels
        noise = torch.randn(x0.shape, generator=generator)
        pred = denoiser(param.renoise(x0, noise, t), t, text.embed(prompts))
        loss = (pred - param.target(x0, noise)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), trained.parameters()):
                e.lerp_(p, 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.info("teacher step %d/%d  loss %.4f  lr %.2e  (%.0f s)", step, cfg.steps, loss.item(),
                     opt.param_groups[0]["lr"], time.time() - start)
        if on_eval is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            on_eval(step + 1, _with_weights(parts, ema))
    stats.update({"teacher_final_loss": loss.item(), "teacher_seconds": time.time() - start, "config": asdict(cfg)})
    return _with_weights(parts, ema), stats


def _with_weights(parts: dict, ema: nn.ModuleList) -> dict:
    """The pipeline parts with the EMA copies in place of the trained transformer and encoders."""
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    out = dict(parts)
    for name, module in zip(names, ema):
        out[name] = copy.deepcopy(module).eval()
    return out


__all__ = ["PretrainConfig", "pretrain", "train_autoencoder"]
