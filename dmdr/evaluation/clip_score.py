"""CLIP score: ``100 * max(cos(image, text), 0)`` per image, as the paper's tables (and torchmetrics' CLIPScore).

The CLIP model is a local folder (``--clip-model``), either an open_clip hub folder
(``open_clip_config.json`` + weights, e.g. ViT-L-14 or DFN5B-CLIP-ViT-H-14-378) or a transformers
``CLIPModel`` folder with its tokenizer (e.g. ``openai/clip-vit-large-patch14``, what torchmetrics uses by
default). Both load through the reward models' own loaders (:mod:`dmdr.rewards.models`), whose one
differentiable preprocessing resizes to the model's input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.evaluation.registry import Metric, Options, Scorer, need_path, register_metric
from dmdr.rewards.models import CLIPReward, PickScoreReward

WHAT = "an open_clip folder or a transformers CLIPModel folder"


def load_clip_encoder(folder: str, flag: str, device: torch.device) -> Any:
    """A frozen CLIP with ``image_features(images)`` / ``text_features(prompts)`` from a local folder.

    An ``open_clip_config.json`` makes it an open_clip model (:class:`~dmdr.rewards.models.CLIPReward`),
    otherwise a transformers ``CLIPModel`` (:class:`~dmdr.rewards.models.PickScoreReward`'s loader).
    """
    field = flag.lstrip("-")
    if (Path(folder).expanduser() / "open_clip_config.json").is_file():
        return CLIPReward(folder, device=device, field=field)
    return PickScoreReward(folder, device=device, scale=1.0, field=field,
                           what=f"{WHAT} (open_clip_config.json + weights, or a CLIPModel save_pretrained layout with "
                                "its tokenizer)")


def cosine(encoder: Any, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine of the L2-normalised image and text embeddings, per image."""
    image = F.normalize(encoder.image_features(images).float(), dim=-1)
    text = F.normalize(encoder.text_features(prompts).float(), dim=-1)
    return (image * text).sum(dim=-1)


def load(options: Options, device: torch.device) -> Scorer:
    encoder = load_clip_encoder(options["clip_model"], "--clip-model", device)

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        return 100.0 * cosine(encoder, images, prompts).clamp(min=0)

    return score


CLIP_SCORE = register_metric(Metric(
    "clip", load=load, check=lambda options: need_path(options, "clip_model", WHAT, "dir")))
