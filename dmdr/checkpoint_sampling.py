"""Sample a training checkpoint's generator without building a trainer (``tools/sample.py --run``).

The generator is rebuilt as training built it (:func:`dmdr.export.load_generator`: the teacher, the generator
LoRA or full copy with the checkpoint's trained or EMA weights; no optimizer, critic state or RL method) and
sampled by :func:`dmdr.generate.sample_images`, the function the run used for its logged sample grids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from dmdr import export
from dmdr.build import DTYPES
from dmdr.generate import sample_images

log = logging.getLogger("dmdr")


def sample_checkpoint(run: str | Path, prompts: list[str], *, step: str | int = "latest", weights: str = "auto",
                      model_path: str = "", seed: int = 1234, device: torch.device | str = "cpu") -> Tensor:
    """Few-step samples ``(B, 3, H, W)`` in [0, 1] of a run's checkpointed generator.

    Args:
        run: the run folder (``train.output_dir``).
        prompts: one image per prompt.
        step: the checkpoint's generator step, or ``"latest"``.
        weights: ``"auto"`` (the EMA when the checkpoint holds one), ``"ema"`` or ``"trained"``.
        model_path: the teacher folder if it moved since training (default: the run's).
        seed: the noise seed (the trainer's sample grids use 1234).
        device: where to sample.

    Raises:
        UserError: a bad run folder, step, weights choice or checkpoint, in one line.
    """
    device = torch.device(device)
    cfg = export.read_run_config(run, model_path)
    checkpoint = export.resolve_checkpoint(run, step)
    backbone, roles, used = export.load_generator(cfg, checkpoint, device=device, weights=weights)
    log.info("sampling %s, %s weights (%d steps)", checkpoint, used, cfg.dmd.num_steps)
    return sample_images(backbone, roles.generator_fn, cfg, prompts, seed=seed, device=device,
                         compute_dtype=DTYPES[cfg.parallel.param_dtype])
