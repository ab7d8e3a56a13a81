"""Helpers of the export tests: a trained run sampled as training samples it, and a stock pipeline's LoRA load.

An export is right when the stock diffusers pipeline reproduces :func:`sample_run`'s ``ours`` (the generator under
the training sampler, ODE, from one seeded noise); ``teacher`` (the critic at LoRA scale 0) shows the match is the
trained generator's.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from dmdr import export
from dmdr.sampling import few_step_sample
from dmdr.schedules import few_step_timesteps


def sample_run(run: Path, prompts: list[str], seed: int = 7) -> SimpleNamespace:
    """``run``'s latest checkpoint: ``cfg``, ``backbone``, ``roles``, ``weights``, ``levels``, the seeded ``noise``,
    ``cond`` of ``prompts``, and the few-step ODE samples of the generator (``ours``) and the teacher."""
    cfg = export.read_run_config(run)
    backbone, roles, weights = export.load_generator(cfg, export.resolve_checkpoint(run))
    levels = few_step_timesteps(cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.t_min)
    noise = torch.randn(len(prompts), *backbone.latent_shape(cfg.model.resolution),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cond = backbone.text_encoder.encode(prompts)
        ours = few_step_sample(roles.generator_fn, noise, cond, levels, backbone.parameterization, mode="ode")
        teacher = few_step_sample(lambda x, t, c: roles.critic_fn(x, t, c, 0.0), noise, cond, levels,
                                  backbone.parameterization, mode="ode")
    return SimpleNamespace(cfg=cfg, backbone=backbone, roles=roles, weights=weights, levels=levels, noise=noise,
                           cond=cond, ours=ours, teacher=teacher)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


TEXT_ENCODER_NOTICE = re.compile(r"No LoRA keys associated to CLIPTextModel\w* found with the prefix='text_encoder")
"""SD3's loader says this for every transformer-only LoRA (it also looks for text-encoder keys): not a key problem."""


def load_lora(pipe, folder: Path) -> list[str]:
    """``pipe.load_lora_weights(folder)``; the warnings diffusers/peft logged or raised while loading, except SD3's
    notice that the file has no text-encoder LoRA (:data:`TEXT_ENCODER_NOTICE`)."""
    records = _Records()
    logger = logging.getLogger("diffusers")  # diffusers' own handlers do not propagate; listen on its root
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(folder))
    finally:
        logger.removeHandler(records)
    messages = records.messages + [str(w.message) for w in caught]
    return [m for m in messages if not TEXT_ENCODER_NOTICE.match(m)]


def few_step_scheduler(pipe, folder: Path) -> None:
    """``folder``'s exported scheduler on ``pipe`` (the few-step levels), without a progress bar."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
