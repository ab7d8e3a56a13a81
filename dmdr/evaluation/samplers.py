"""The models an evaluation samples, behind one interface: an export, a base (teacher) folder, a checkpoint.

:func:`load_model` tells them apart by what the path holds:

* an **exported few-step folder** (``model_index.json`` + ``dmdr_inference.json``, written by
  ``tools/convert_to_diffusers.py``): dmdr's own ode sampler on its saved levels (the stock pipeline's
  exact call gives the same images, see :mod:`dmdr.export`); ``steps`` re-derives the levels for another N;
* a **base diffusers folder** (``model_index.json`` only, the teacher): the multi-step CFG sampler
  :func:`dmdr.sampling.teacher_sample` (``steps`` *default* 28, ``guidance`` *default* 7.0, the scheduler's
  ``shift``), uncond = the empty prompt;
* a **training checkpoint** ``<output_dir>/checkpoints/step-N`` (or a run folder: its latest checkpoint):
  the generator rebuilt as training built it (:func:`dmdr.export.load_generator`, ``weights`` auto / ema /
  trained) on the run's few-step schedule.

Every model samples from the noise it is given (:func:`noise_for`): the latent of image ``(prompt p,
seed s)`` depends only on ``(p, s)`` and the latent shape, never on the batch, the rank or the model, so two
models of one latent space are compared image by image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr import export
from dmdr.errors import ModelLoadError
from dmdr.export import SETTINGS_FILE, InferenceSettings
from dmdr.models import load_backbone
from dmdr.models.base import conditioning_to, repeat_conditioning
from dmdr.sampling import few_step_sample, teacher_sample
from dmdr.schedules import few_step_timesteps

TEACHER_STEPS = 28
TEACHER_GUIDANCE = 7.0
NOT_A_MODEL = ("is neither a diffusers pipeline folder (model_index.json), a dmdr run folder (config.json + "
               "checkpoints/) nor a training checkpoint (<output_dir>/checkpoints/step-N)")


def noise_for(prompt_index: int, seed: int, shape: tuple[int, ...]) -> Tensor:
    """The float32 CPU latent of image ``(prompt_index, seed)``: its own generator, seeded by both."""
    g = torch.Generator().manual_seed(seed * 2**32 + prompt_index)
    return torch.randn(shape, generator=g, dtype=torch.float32)


@dataclass
class EvalModel:
    """A loaded model ready to sample: ``sample(prompts, noise) -> (B, 3, H, W)`` images in ``[0, 1]``."""

    name: str
    path: str
    kind: str
    """``export``, ``base`` or ``checkpoint``."""
    backbone: Any
    fn: Any
    """The prediction function ``fn(x_t, t, cond)``."""
    steps: int
    resolution: int
    guidance: float | None = None
    """CFG scale (base models); ``None``: no CFG (few-step generators)."""
    timesteps: Tensor | None = None
    shift: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Network evaluations per image: CFG's uncond and cond passes count as two."""
        return self.steps * (2 if self.guidance is not None else 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.backbone.latent_shape(self.resolution)

    @torch.no_grad()
    def sample(self, prompts: list[str], noise: Tensor) -> Tensor:
        device, dtype = self.device, self.dtype
        noise = noise.to(device, dtype)
        cond = conditioning_to(self.backbone.text_encoder.encode(list(prompts)), device)
        param = self.backbone.parameterization
        if self.guidance is None:
            latents = few_step_sample(self.fn, noise, cond, self.timesteps, param, mode="ode")
        else:
            uncond = repeat_conditioning(conditioning_to(self.backbone.text_encoder.negative(), device), len(prompts))
            latents = teacher_sample(self.fn, noise, cond, uncond, param, guidance=self.guidance,
                                     num_steps=self.steps, shift=self.shift)
        return self.backbone.codec.decode(latents).float().clamp(0, 1)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.teacher.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.teacher.parameters()).dtype


def release_form(path: str | Path) -> str:
    """An export's form from its ``dmdr_inference.json`` (``pipeline``, ``lora``, ``single-file``); ``""`` if none."""
    try:
        source = json.loads((Path(path) / SETTINGS_FILE).read_text()).get("source", {})
    except (OSError, ValueError, AttributeError):
        return ""
    return str(source.get("form", "pipeline")) if isinstance(source, dict) else "pipeline"


def model_kind(path: str | Path) -> str:
    """``export``, ``release`` (a ``--lora`` / ``--single-file`` export, loaded onto its base), ``base``, ``run`` or
    ``checkpoint``; anything else is one :class:`ModelLoadError` line."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"--model {p} {'does not exist' if not p.exists() else NOT_A_MODEL}")
    if release_form(p) in ("lora", "single-file"):
        return "release"
    if (p / "model_index.json").is_file():
        return "export" if (p / SETTINGS_FILE).is_file() else "base"
    if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        return "run"
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.json").is_file():
        return "checkpoint"
    raise ModelLoadError(f"--model {p} {NOT_A_MODEL}")


def load_model(path: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
               steps: int | None = None, guidance: float | None = None, weights: str = "auto",
               resolution: int | None = None, name: str | None = None) -> EvalModel:
    """Load the model at ``path`` (see the module doc) on ``device`` in ``dtype``.

    Args:
        steps: sampling steps; ``None`` keeps the model's own (few-step: as trained; base: 28).
        guidance: CFG scale of a base model (``None``: 7.0); ignored by few-step generators (no CFG).
        weights: a checkpoint's generator weights, ``auto`` / ``ema`` / ``trained``.
        resolution: image side in pixels; ``None`` keeps the model's own.
    """
    p = Path(path).expanduser()
    kind = model_kind(p)
    name = name or p.name
    if kind == "export":
        s = InferenceSettings.read(p)
        backbone = load_backbone(p, dtype=dtype, device=device, t_min=s.t_min,
                                 max_sequence_length=s.max_sequence_length)
        n = steps or s.num_inference_steps
        backbone.teacher.configure_guidance(s.generator_guidance)  # FLUX.1-dev: the generator's embedding
        return EvalModel(name, str(p), kind, backbone, backbone.teacher, n, resolution or s.resolution,
                         timesteps=few_step_timesteps(n, s.shift, s.t_min), shift=s.shift,
                         info={"source": json.loads((p / SETTINGS_FILE).read_text()).get("source", {})})
    if kind == "release":
        return _load_release(p, name, device, dtype, steps, resolution)
    if kind == "base":
        backbone = load_backbone(p, dtype=dtype, device=device)
        shift = float(backbone.extras.get("scheduler_config", {}).get("shift", 1.0))
        sample_size = getattr(backbone.teacher.net.config, "sample_size", None)
        res = resolution or (int(sample_size) * backbone.vae_scale_factor if sample_size else 1024)
        if backbone.teacher.score_rule().embedded:  # FLUX.1-dev: the scale is an input embedding (default 3.5)
            if guidance is not None:
                backbone.teacher.configure_guidance(float(guidance))
            guidance = 1.0  # and CFG off
        guidance = TEACHER_GUIDANCE if guidance is None else float(guidance)
        return EvalModel(name, str(p), kind, backbone, backbone.teacher, steps or TEACHER_STEPS, res,
                         guidance=guidance, shift=shift)
    return _load_checkpoint(p, kind, name, device, dtype, steps, weights, resolution)


def _load_release(p: Path, name: str, device: torch.device, dtype: torch.dtype, steps: int | None,
                  resolution: int | None) -> EvalModel:
    """A ``--lora`` / ``--single-file`` export scored as its card loads it: :func:`dmdr.export.load_release` builds
    the stock pipeline on the recorded base (the LoRA fused), and its denoiser's weights replace the base's in
    dmdr's backbone of that base, sampled on the export's saved levels like a merged export."""
    s = InferenceSettings.read(p)
    source = json.loads((p / SETTINGS_FILE).read_text()).get("source", {})
    base = Path(source.get("teacher", ""))
    pipe: Any = export.load_release(p)  # one line if the recorded base is gone
    if release_form(p) == "lora":
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    weights = getattr(pipe, s.denoiser_component).state_dict()
    del pipe
    backbone = load_backbone(base, dtype=dtype, device=device, t_min=s.t_min, max_sequence_length=s.max_sequence_length)
    missing, unexpected = backbone.teacher.net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"--model {p}: the {release_form(p)} export does not match its base {base} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected weights)")
    n = steps or s.num_inference_steps
    return EvalModel(name, str(p), "release", backbone, backbone.teacher, n, resolution or s.resolution,
                     timesteps=few_step_timesteps(n, s.shift, s.t_min), shift=s.shift, info={"source": source})


def _load_checkpoint(p: Path, kind: str, name: str, device: torch.device, dtype: torch.dtype, steps: int | None,
                     weights: str, resolution: int | None) -> EvalModel:
    run = p if kind == "run" else p.parent.parent
    cfg = export.read_run_config(run)
    checkpoint = export.resolve_checkpoint(run, "latest" if kind == "run" else _step_of(p))
    backbone, roles, used = export.load_generator(cfg, checkpoint, device=device, dtype=dtype, weights=weights)
    n = steps or cfg.dmd.num_steps
    if kind == "run":
        name = f"{name}/{checkpoint.name}"
    return EvalModel(name, str(checkpoint), "checkpoint", backbone, roles.generator_fn, n,
                     resolution or cfg.model.resolution, timesteps=few_step_timesteps(n, cfg.dmd.shift, cfg.dmd.t_min),
                     shift=cfg.dmd.shift, info={"weights": used, "roles": roles})


def _step_of(p: Path) -> str:
    prefix = "step-"
    if not p.name.startswith(prefix) or not p.name[len(prefix):].isdigit():
        raise ModelLoadError(f"--model {p} {NOT_A_MODEL}")
    return p.name[len(prefix):]


__all__ = ["EvalModel", "load_model", "model_kind", "noise_for", "TEACHER_STEPS", "TEACHER_GUIDANCE"]
