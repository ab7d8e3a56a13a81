"""The semantic-relative reward (the DMDR authors' SRPO-style variant; ALGORITHM.md, RL branch).

With the HPS model's encoders, one positive control word ``a+`` from {Natural-lighting, Detailed,
Realistic} and one negative ``a-`` from {Painting, CG Render, Oil}, and the texts ``"<a>. <prompt>"``::

    r = (1 + k) cos(f_img, f_text(a+)) - cos(f_img, f_text(a-))        (k default 0.1, rl.srpo_k)

The words are picked once per call (one generator step's batch) from a hash of the batch's prompts:
a deterministic function of the step's input, so a resumed run picks the same words without any
state in the checkpoint, and different steps see different words. ``--rl.rewards srpo`` uses it in ReFL
(with ``--rl.hps_checkpoint`` / ``--rl.hps_arch``; the authors pair it with the CLIP reward:
``L_dmd + 0.1 relu(0.7 - cos_DFN) + 5 relu(0.7 - r)``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from dmdr.rewards.models import HPS_ARCH, HPSReward, _cosine

POSITIVE_WORDS = ("Natural-lighting", "Detailed", "Realistic")
NEGATIVE_WORDS = ("Painting", "CG Render", "Oil")


class SemanticRelativeReward(HPSReward):
    """``(1 + k) cos(f, f+) - cos(f, f-)`` with the HPS encoders (loaded exactly as :class:`HPSReward`)."""

    name = "srpo"

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", arch: str = HPS_ARCH,
                 resolution: int = 224, k: float = 0.1, field: str = "rl.hps_checkpoint"):
        super().__init__(checkpoint, device=device, arch=arch, resolution=resolution, field=field)
        self.k = float(k)

    @staticmethod
    def control_words(prompts: list[str]) -> tuple[str, str]:
        """The ``(a+, a-)`` of a batch: chosen by a hash of its prompts (resumable, no state)."""
        digest = hashlib.blake2b("\x1f".join(prompts).encode(), digest_size=8).digest()
        h = int.from_bytes(digest, "little")
        return POSITIVE_WORDS[h % len(POSITIVE_WORDS)], NEGATIVE_WORDS[(h // len(POSITIVE_WORDS)) % len(NEGATIVE_WORDS)]

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        positive, negative = self.control_words(list(prompts))
        texts = [f"{positive}. {p}" for p in prompts] + [f"{negative}. {p}" for p in prompts]
        pixels = self.preprocess(images.to(self.device), dtype=self.dtype)
        with torch.no_grad():
            text = self.model.encode_text(self.tokenizer(texts).to(self.device))
        f_pos, f_neg = text.chunk(2)
        image = self.model.encode_image(pixels)
        return (1 + self.k) * _cosine(image, f_pos) - _cosine(image, f_neg)


__all__ = ["SemanticRelativeReward", "POSITIVE_WORDS", "NEGATIVE_WORDS"]
