"""Image statistics that exist for any text-to-image model (no exact checker needed).

Reward hacking and collapse show in them before anyone looks: HPS/PickScore-driven runs drift to
saturated colour, DMD runs over-saturate or collapse to blank or static frames, mode collapse makes
the seeds of one prompt look alike. The colour statistics take RGB images in ``[0, 1]``, shape
``(B, 3, H, W)``; the diversity measures take any per-sample tensor (images, latents, embeddings) laid
out seed-major, as the probe samples them: all prompts of seed 0, then all prompts of seed 1, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_LOW, CLIP_HIGH = 1 / 255, 254 / 255
"""A channel value at or beyond these is a clipped pixel (what an 8-bit export saves as 0 or 255)."""


def saturation(images: Tensor) -> float:
    """Mean HSV saturation ``(max - min) / max`` over pixels (0 for black pixels)."""
    x = images.float().clamp(0, 1)
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return sat.mean().item()


def colourfulness(images: Tensor) -> float:
    """Hasler & Suesstrunk's colourfulness (2003), per image, averaged: ``sigma_rgyb + 0.3 mu_rgyb`` on [0, 1]."""
    x = images.float().clamp(0, 1)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    sigma = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
    mu = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
    return (sigma + 0.3 * mu).mean().item()


def clipped_fraction(images: Tensor) -> float:
    """Fraction of channel values at or beyond 1/255 from either end of [0, 1]."""
    x = images.float()
    return ((x <= CLIP_LOW) | (x >= CLIP_HIGH)).float().mean().item()


def seed_diversity(samples: Tensor, seeds: int) -> float:
    """Mean RMS distance between the samples of one prompt drawn with different seeds.

    Works on any per-sample tensor: images (pixel diversity) or the student's latents (the VAE's latent
    space, a feature space every latent model has without downloading anything).

    Args:
        samples: ``(seeds * P, ...)``, seed-major.
    """
    x = samples.float().reshape(seeds, -1, *samples.shape[1:])
    total, pairs = 0.0, 0
    for i in range(seeds):
        for j in range(i + 1, seeds):
            total += (x[i] - x[j]).pow(2).flatten(1).mean(dim=1).sqrt().mean().item()
            pairs += 1
    return total / pairs


def cosine_diversity(features: Tensor, seeds: int) -> float:
    """Mean ``1 - cos`` between the embeddings (e.g. CLIP image features) of one prompt's seeds.

    Args:
        features: ``(seeds * P, D)``, seed-major.
    """
    f = F.normalize(features.float().flatten(1), dim=-1).reshape(seeds, -1, features[0].numel())
    total, pairs = 0.0, 0
    for i in range(seeds):
        for j in range(i + 1, seeds):
            total += (1 - (f[i] * f[j]).sum(dim=-1)).mean().item()
            pairs += 1
    return total / pairs


def nonfinite_count(x: Tensor) -> int:
    """Entries of ``x`` that are NaN or infinite."""
    return int((~torch.isfinite(x)).sum().item())


def image_signals(images: Tensor, seeds: int) -> dict[str, float]:
    """Every image statistic of a probe, keyed as logged (``probe/...``)."""
    finite = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=0.0)
    return {"probe/saturation": saturation(finite), "probe/colourfulness": colourfulness(finite),
            "probe/clipped": clipped_fraction(finite), "probe/diversity": seed_diversity(finite, seeds),
            "probe/nonfinite": float(nonfinite_count(images))}
