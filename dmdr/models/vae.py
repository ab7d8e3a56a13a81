"""The frozen ``AutoencoderKL`` of the SD3 and Z-Image families as a :class:`~dmdr.models.base.LatentCodec`.

Denoiser latents are ``(z - shift_factor) * scaling_factor`` of the VAE's latent ``z`` (both
constants from the VAE's config, as the diffusers pipelines use them); images are RGB in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AutoencoderKLCodec:
    """Decode / encode between denoiser latents and ``[0, 1]`` RGB with a diffusers ``AutoencoderKL``."""

    def __init__(self, vae: nn.Module):
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to RGB in ``[0, 1]`` (in the latents' dtype); differentiable (ReFL runs through it)."""
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """RGB in ``[0, 1]`` to denoiser latents: the posterior mean (a sample when given ``generator``)."""
        dist = self.vae.encode((images.to(self.vae.dtype) * 2 - 1), return_dict=False)[0]
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def to(self, device: torch.device | str) -> AutoencoderKLCodec:
        self.vae.to(device)
        return self
