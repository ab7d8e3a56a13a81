"""PickScore: ``logit_scale.exp() * cos(image, text)`` of the PickScore CLIP (raw, about 20), per image."""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr.evaluation.registry import Metric, Options, Scorer, need_path, register_metric
from dmdr.rewards.models import PickScoreReward


def load(options: Options, device: torch.device) -> Scorer:
    reward = PickScoreReward(options["pickscore_model"], device=device, scale=1.0, field="pickscore-model")

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        return reward(images, prompts).float()

    return score


PICKSCORE = register_metric(Metric("pickscore", load=load, check=lambda options: need_path(
    options, "pickscore_model", "a transformers CLIPModel folder, e.g. yuvalkirstain/PickScore_v1", "dir")))
