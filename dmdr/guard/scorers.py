"""The probe's optional model-based signals, from models the user points at by local path (nothing is downloaded).

* ``--guard.clip_model`` (an open_clip hub folder or a transformers ``CLIPModel`` folder, as ``tools/eval.py
  --clip-model``): ``probe/clip_score``, the CLIP score ``100 max(cos(image, prompt), 0)`` of the probe images
  (prompt alignment: a hacked reward trades it away), and ``probe/diversity_clip``, the mean ``1 - cos``
  between the CLIP image embeddings of one prompt's seeds (a semantic diversity: mode collapse lowers it).
* ``--guard.aesthetic_head`` (LAION's ``sac+logos+ava1-l14-linearMSE.pth``, on ``--guard.clip_model`` = CLIP
  ViT-L/14): ``probe/aesthetic``, the LAION aesthetic score (about 1-10).
* ``--guard.lpips_weights`` (one local ``lpips.LPIPS`` state dict, made once as :mod:`dmdr.evaluation.diversity`
  says): ``probe/diversity_lpips``, the mean pairwise LPIPS of one prompt's seeds (the paper's diversity).

Without them the probe still measures diversity in pixels and in the VAE's latent space (:mod:`.probe`).
The math is the evaluation metrics' own (:mod:`dmdr.evaluation.clip_score`, ``aesthetic``, ``diversity``);
a bad path or a checkpoint of the wrong kind is one line naming the ``--guard.*`` flag, before the models load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.errors import ModelLoadError
from dmdr.guard.signals import cosine_diversity


@dataclass
class ProbeScorers:
    """The loaded models (each None when not configured)."""

    clip: Any = None
    """A frozen CLIP, ``image_features`` / ``text_features`` (:func:`dmdr.evaluation.clip_score.load_clip_encoder`)."""
    aesthetic: torch.nn.Module | None = None
    """LAION's aesthetic head on the L2-normalised embeddings of :attr:`clip`."""
    lpips: torch.nn.Module | None = None

    @classmethod
    def from_config(cls, g: Any, device: torch.device) -> ProbeScorers:
        """From a :class:`~dmdr.config.GuardConfig`; loads only what is configured."""
        clip = aesthetic = lpips = None
        if g.clip_model:
            from dmdr.evaluation.clip_score import load_clip_encoder

            clip = load_clip_encoder(g.clip_model, "--guard.clip_model", device)
        if g.aesthetic_head:
            from dmdr.evaluation.aesthetic import load_head

            aesthetic = load_head(g.aesthetic_head, "--guard.aesthetic_head").to(device)
            size = clip.preprocess.size
            size = size if isinstance(size, tuple) else (size, size)
            with torch.no_grad():
                width = clip.image_features(torch.zeros(1, 3, *size, device=device)).shape[-1]
            if width != aesthetic[0].in_features:
                raise ModelLoadError(f"--guard.aesthetic_head {g.aesthetic_head}: the head takes "
                                     f"{aesthetic[0].in_features}-d embeddings but --guard.clip_model gives "
                                     f"{width}-d ones (use CLIP ViT-L/14)")
        if g.lpips_weights:
            from dmdr.evaluation.diversity import load_lpips

            lpips = load_lpips(g.lpips_weights, flag="--guard.lpips_weights").to(device)
        return cls(clip, aesthetic, lpips)

    @torch.no_grad()
    def signals(self, images: Tensor, prompts: list[str], seeds: int) -> dict[str, float]:
        """The configured signals of the probe images.

        Args:
            images: ``(seeds * P, 3, H, W)`` in ``[0, 1]``, seed-major.
            prompts: the ``seeds * P`` prompts they were sampled from (``P`` prompts, repeated per seed).
            seeds: noise draws per prompt.
        """
        out: dict[str, float] = {}
        if self.clip is not None:
            from dmdr.evaluation.clip_score import cosine

            out["probe/clip_score"] = (100.0 * cosine(self.clip, images, prompts).clamp(min=0)).mean().item()
            features = self.clip.image_features(images).float()
            out["probe/diversity_clip"] = cosine_diversity(features, seeds)
            if self.aesthetic is not None:
                head_input = F.normalize(features, dim=-1).to(self.aesthetic[0].weight.dtype)
                out["probe/aesthetic"] = self.aesthetic(head_input).float().mean().item()
        if self.lpips is not None:
            from dmdr.evaluation.diversity import mean_pairwise

            per_prompt = images.float().reshape(seeds, -1, *images.shape[1:]).transpose(0, 1)
            out["probe/diversity_lpips"] = torch.cat([mean_pairwise(self.lpips, x) for x in per_prompt]).mean().item()
        return out
