"""HPSv2.1: the HPS checkpoint in open_clip ViT-H-14, cosine of normalised features, per image.

The benchmark's own scoring (the ``hpsv2`` package's ``score``): the prompt as given, no prefix (the
training reward's ``"Realistic photo "`` prefix is a ReFL choice, not part of the metric); the same
number as ``hpsv2.score(image, prompt, cp=<checkpoint>, hps_version="v2.1")`` (tested to 1e-5).
``--hps-arch`` names another open_clip architecture (tests use a tiny one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr.evaluation.registry import Metric, Options, Scorer, need_path, register_metric
from dmdr.rewards.models import HPS_ARCH, HPSReward


def load(options: Options, device: torch.device) -> Scorer:
    reward = HPSReward(options["hps_checkpoint"], device=device, arch=options.get("hps_arch") or HPS_ARCH,
                       field="hps-checkpoint", prefix="")

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        return reward(images, prompts).float()

    return score


HPS = register_metric(Metric("hps", load=load, check=lambda options: need_path(
    options, "hps_checkpoint", "the HPSv2.1 checkpoint file, e.g. HPS_v2.1_compressed.pt", "file")))
