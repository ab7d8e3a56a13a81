"""Few-step images from a generator: the training run's sample grids and ``tools/sample.py --run``.

One function for both, so a checkpoint sampled after training gives the images the run logged for the same
prompts and seed: fixed noise from ``seed``, the run's ``dmd.sampler`` (an ``sde`` sampler's fresh noise continues
the seeded stream, as a diffusers pipeline's ``generator``), no CFG, decoded to [0, 1].
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from dmdr.config import TrainConfig
from dmdr.models.base import Backbone, conditioning_to
from dmdr.sampling import PredictFn, few_step_sample
from dmdr.schedules import generator_levels


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed-precision compute for unsharded runs (bf16 / fp16); a no-op in fp32 and under FSDP2 (``dtype`` None)."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


@torch.no_grad()
def sample_images(backbone: Backbone, generator_fn: PredictFn, cfg: TrainConfig, prompts: list[str], *,
                  seed: int = 1234, device: torch.device, compute_dtype: torch.dtype | None = None) -> Tensor:
    """Few-step samples ``(B, 3, H, W)`` in [0, 1] of ``generator_fn`` for ``prompts``, on noise from ``seed``.

    Without a text encoder (an embedding-cache run) the conditioning is ``backbone.extras["sample_cond"]``.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (len(prompts), *backbone.latent_shape(cfg.model.resolution))
    noise = torch.randn(shape, generator=g, device=device)
    if backbone.text_encoder is not None:
        cond = conditioning_to(backbone.text_encoder.encode(prompts), device)
    else:
        cond = conditioning_to(backbone.extras["sample_cond"], device)
    d = cfg.dmd
    timesteps = generator_levels(d.num_steps, d.shift, d.t_min, d.timesteps, backbone.parameterization).to(device)
    with autocast(device, compute_dtype):
        latents = few_step_sample(generator_fn, noise, cond, timesteps, backbone.parameterization, mode=d.sampler,
                                  generator=g)
        return backbone.codec.decode(latents).float()
