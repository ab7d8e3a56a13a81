"""Export a trained generator as a stock diffusers pipeline folder that reproduces dmdr's few-step sampler.

Library side of ``tools/convert_to_diffusers.py`` and ``tools/sample.py``: find a run's checkpoint,
rebuild its generator exactly as training did (:func:`load_generator`), fold it into a plain diffusers
transformer (:func:`export_transformer`), and write the folder (:func:`write_pipeline`; the LoRA and
single-file forms are in :mod:`dmdr.release`, the model card in :mod:`dmdr.model_card`).

Which weights (``weights``, the tools' ``--weights``): ``trained`` are the generator's parameters as the
optimizer left them; ``ema`` replaces its trainable parameters (LoRA mode: the generator adapter's
``A`` and ``B``; full mode: the whole copy) with the exponential moving average the trainer keeps when
``optim.ema_decay > 0`` (checkpoint entry ``trainer``, tensors ``trainer.ema.<parameter name>``, see
:meth:`dmdr.trainer.Roles.generator_param_names`); ``auto`` (the default) takes the EMA when the
checkpoint holds one, else the trained weights. In LoRA mode the exported EMA model is the base plus
``alpha/r * B_ema A_ema`` (the averages of the factors, as training kept them).

The schedule (:class:`InferenceSettings`, the one place for this mapping). dmdr's sampler
(:func:`dmdr.sampling.few_step_sample`, ode mode) calls the generator at the levels
``t_0 .. t_{N-1}`` of :func:`dmdr.schedules.few_step_timesteps` (already shifted) and Euler-steps
``x <- x + (t_{i+1} - t_i) v``; its last step lands on ``t_N = t_min``, not 0 (the clean estimate
``x_t + (t_min - t) v``). diffusers 0.42's ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=s)``:

* shifts the passed sigmas again, ``shift * s / (1 + (shift - 1) s)`` (or the dynamic ``mu`` shift when
  ``use_dynamic_shifting``): the exported scheduler has ``shift = 1.0`` and no dynamic shifting, which
  leaves ``s`` bit-for-bit unchanged (``1.0 * s / (1 + 0.0 * s)``), and the sigmas passed are our
  shifted float32 levels; ``timesteps = 1000 * s`` in float32 then equal the ``1000 t`` dmdr feeds the
  network (``num_train_timesteps`` is pinned to 1000 for that);
* appends a terminal sigma 0; each ``step`` is ``x + (s_{i+1} - s_i) * model_output``.

So passing the N levels ``t_0 .. t_{N-1}`` (:attr:`InferenceSettings.sigmas`) gives our first N - 1
steps exactly and a last step to 0 instead of ``t_min``: the output differs from dmdr's by exactly
``t_min * v_last`` (about 0.1 % of one velocity, invisible in the image). The stock scheduler cannot end
at ``t_min``, so the exact reproduction (:meth:`InferenceSettings.pipeline_kwargs` with ``exact=True``)
passes the N + 1 levels ``t_0 .. t_N = t_min`` and stops the pipeline after N steps with a step-end
callback (:class:`StopAfterSteps`, diffusers' documented ``pipe._interrupt`` switch): the N model calls
and Euler steps are then dmdr's own, to fp32 rounding.

No CFG: ``StableDiffusion3Pipeline`` guides when ``guidance_scale > 1`` (we pass 1.0),
``ZImagePipeline`` when ``guidance_scale > 0`` (we pass 0.0), ``StableDiffusionXLPipeline`` when
``guidance_scale > 1`` (we pass 0.0, as the authors' SDXL demo).

SDXL (epsilon UNet on integer timesteps, :mod:`dmdr.models.sdxl`): the exported scheduler is an
``LCMScheduler`` on the teacher's betas, called with ``timesteps=[...]`` = the run's ``dmd.timesteps``
(e.g. ``[999, 749, 499, 249]`` or ``[399]``). Its step is dmdr's ``sde`` sampler (``dmd.sampler``): the
clean estimate ``(x - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` (LCM's boundary condition multiplies it by
``c_out = 1 - O(1e-8)`` and adds ``c_skip = O(1e-8)`` of the input at these timesteps), renoised with fresh
noise to the next timestep, and the last step returns the clean estimate. The pipeline draws its initial
latents and then each step's noise from the ``generator`` it is given, the order dmdr's sampler draws them
in, so the same seeded generator gives dmdr's sample to fp32 rounding. The UNet goes to ``unet/``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dmdr.config import TrainConfig, from_dict
from dmdr.errors import CheckpointError, ConfigError, ModelLoadError
from dmdr.models.families import family_of_pipeline
from dmdr.models.family import FamilySpec

SETTINGS_FILE = "dmdr_inference.json"
SETTINGS_FORMAT = 1
NUM_TRAIN_TIMESTEPS = 1000
"""dmdr's denoisers call the network with ``1000 t``; the scheduler's ``timesteps = num_train_timesteps * s``."""
WEIGHTS = ("auto", "ema", "trained")
"""Choices of ``weights`` / ``--weights`` (see the module doc)."""
EMA_PREFIX = "trainer.ema."
"""DCP key prefix of the trainer's EMA tensors (:meth:`dmdr.trainer.DMDRTrainer.state_dict`, entry ``trainer``)."""
LCM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
"""The teacher scheduler's settings the exported ``LCMScheduler`` keeps (they define ``alphas_cumprod``)."""


class StopAfterSteps:
    """``callback_on_step_end`` that interrupts a diffusers pipeline after ``num_steps`` denoising steps."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if step + 1 >= self.num_steps:
            pipe._interrupt = True  # the pipeline skips the remaining loop iterations
        return {}


@dataclass(frozen=True)
class InferenceSettings:
    """How to call the exported pipeline so that it runs dmdr's few-step sampler (see the module doc)."""

    pipeline_class: str
    num_inference_steps: int
    shift: float
    """The run's ``dmd.shift``: already applied to the sigmas (the exported scheduler's shift is 1.0)."""
    t_min: float
    resolution: int
    max_sequence_length: int
    timesteps: tuple[float, ...] = ()
    """The run's ``dmd.timesteps`` (fixed model timesteps; SDXL's integers), empty for a shifted schedule."""

    @property
    def family(self) -> FamilySpec | None:
        """The family of :attr:`pipeline_class` (``None``: unknown, read as a flow transformer pipeline)."""
        return family_of_pipeline(self.pipeline_class)

    @property
    def epsilon(self) -> bool:
        """An epsilon-prediction UNet pipeline (``LCMScheduler`` + ``timesteps``) rather than a flow."""
        return self.family is not None and self.family.prediction == "epsilon"

    @property
    def denoiser_component(self) -> str:
        return self.family.denoiser_component if self.family else "transformer"

    @property
    def scheduler_class(self) -> str:
        return "LCMScheduler" if self.epsilon else "FlowMatchEulerDiscreteScheduler"

    @property
    def levels(self) -> list[float]:
        """The N + 1 levels ``t_0 = 1 .. t_N = t_min`` of the training sampler (float32 values)."""
        from dmdr.parameterization import FlowMatching
        from dmdr.schedules import generator_levels

        return generator_levels(self.num_inference_steps, self.shift, self.t_min, self.timesteps,
                                FlowMatching(self.t_min, timestep_scale=NUM_TRAIN_TIMESTEPS)).tolist()

    @property
    def sigmas(self) -> list[float]:
        """The N levels the network is called at; the scheduler appends the terminal 0."""
        return self.levels[:-1]

    @property
    def guidance_scale(self) -> float:
        """The pipeline's ``guidance_scale`` that switches CFG off (dmdr's generator is distilled with CFG)."""
        return self.family.no_cfg_guidance if self.family else 0.0

    def pipeline_kwargs(self, exact: bool = True) -> dict[str, Any]:
        """Keyword arguments for the stock pipeline's ``__call__`` (add ``prompt``, ``latents`` / ``generator``).

        ``exact``: N + 1 sigmas ending at ``t_min`` and a stop after N steps (dmdr's sampler to fp32
        rounding); otherwise the N sigmas alone (last step to 0: off by ``t_min * v_last``).
        """
        n = self.num_inference_steps
        if self.epsilon:  # LCMScheduler: the fixed timesteps are the whole schedule, its last step is exact
            return {"num_inference_steps": n, "timesteps": [int(t) for t in self.timesteps],
                    "guidance_scale": self.guidance_scale, "height": self.resolution, "width": self.resolution}
        kwargs: dict[str, Any] = {
            "num_inference_steps": n, "guidance_scale": self.guidance_scale, "height": self.resolution,
            "width": self.resolution, "max_sequence_length": self.max_sequence_length,
        }
        if exact:
            kwargs.update(sigmas=self.levels, callback_on_step_end=StopAfterSteps(n))
        else:
            kwargs["sigmas"] = self.sigmas
        return kwargs

    def to_json(self) -> dict[str, Any]:
        data = {"format": SETTINGS_FORMAT, **asdict(self), "timesteps": list(self.timesteps),
                "guidance_scale": self.guidance_scale}
        if self.epsilon:
            return {**data, "scheduler": {"class": self.scheduler_class}}
        return {**data, "sigmas": self.sigmas,
                "exact": {"sigmas": self.levels, "stop_after_steps": self.num_inference_steps},
                "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                              "use_dynamic_shifting": False}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InferenceSettings:
        try:
            return cls(str(data["pipeline_class"]), int(data["num_inference_steps"]), float(data["shift"]),
                       float(data["t_min"]), int(data["resolution"]), int(data["max_sequence_length"]),
                       tuple(float(t) for t in data.get("timesteps", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{SETTINGS_FILE} lacks or mangles {e}; re-export the pipeline") from None

    @classmethod
    def from_config(cls, cfg: TrainConfig, pipeline_class: str) -> InferenceSettings:
        d = cfg.dmd
        settings = cls(pipeline_class, d.num_steps, d.shift, d.t_min, cfg.model.resolution,
                       cfg.model.max_sequence_length, tuple(d.timesteps))
        if settings.epsilon and len(settings.timesteps) != d.num_steps:
            raise ConfigError(f"the run has no dmd.timesteps: a {pipeline_class} export needs the fixed integer "
                              "timesteps its generator was trained at (e.g. 999,749,499,249)")
        if settings.epsilon and d.sampler != "sde" and d.num_steps > 1:
            warnings.warn(f"dmd.sampler={d.sampler}: the exported LCMScheduler renoises with fresh noise (the sde "
                          "sampler), so its multi-step samples differ from the run's sample images", stacklevel=2)
        if not settings.epsilon and d.sampler != "ode":
            raise ConfigError(f"dmd.sampler={d.sampler}: the exported FlowMatchEulerDiscreteScheduler runs the ode "
                              "sampler only; sample this run with tools/sample.py --run")
        return settings

    @classmethod
    def read(cls, folder: str | Path) -> InferenceSettings:
        """The settings saved in an exported pipeline folder."""
        file = Path(folder) / SETTINGS_FILE
        try:
            return cls.from_json(json.loads(file.read_text()))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{file} is missing or unreadable ({e}): not a folder written by "
                                 "tools/convert_to_diffusers.py") from None


def lcm_scheduler_config(teacher: dict[str, Any] | None) -> dict[str, Any]:
    """The exported ``LCMScheduler`` config: the teacher's betas (so ``alphas_cumprod`` is the training table)."""
    return {k: v for k, v in (teacher or {}).items() if k in LCM_KEYS}


def scheduler_config(teacher: dict[str, Any] | None) -> dict[str, Any]:
    """The exported ``FlowMatchEulerDiscreteScheduler`` config: the teacher's, with sigmas passed through as given."""
    config = {k: v for k, v in (teacher or {}).items() if not k.startswith("_")}
    config.update(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0, use_dynamic_shifting=False, shift_terminal=None,
                  invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                  stochastic_sampling=False)
    return config


# ----------------------------------------------------------------------------------------------- runs
def read_run_config(run: str | Path, model_path: str = "") -> TrainConfig:
    """The resolved config of a run folder (``<run>/config.json``); ``model_path`` replaces ``model.path``."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist (pass the training run's train.output_dir)")
    file = run / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file} is missing or not valid JSON ({e}); is {run} a dmdr run folder?") from None
    cfg = from_dict(data)
    if model_path:
        cfg.model.path = model_path
    if not (Path(cfg.model.path) / "model_index.json").is_file():
        raise ModelLoadError(f"the run's teacher folder {cfg.model.path!r} (model.path in {file}) is gone or not a "
                             "diffusers pipeline folder; pass --model-path to its current location")
    return cfg


def resolve_checkpoint(run: str | Path, step: str | int = "latest") -> Path:
    """``<run>/checkpoints/step-<step>``, or the newest complete one for ``latest``; checked (sizes, CRC32)."""
    from dmdr.distributed.checkpoint import CheckpointManager, verify_checkpoint

    manager = CheckpointManager(run)
    if str(step) == "latest":
        path = manager.latest()
        if path is None:
            raise CheckpointError(f"no complete checkpoint in {manager.root} (train longer, or check the run folder)")
    else:
        try:
            path = manager.step_dir(int(step))
        except ValueError:
            raise CheckpointError(f"--step {step!r}: give a generator step number or 'latest'") from None
        if not path.is_dir():
            have = ", ".join(p.name for p in manager.checkpoints()) or "none"
            raise CheckpointError(f"no checkpoint {path} (have: {have})")
    reason = verify_checkpoint(path, checksums=True)
    if reason:
        raise CheckpointError(f"{reason}; pass --step with another checkpoint's step" if str(step) == "latest"
                              else reason)
    return path


def checkpoint_ema_names(checkpoint: str | Path) -> list[str]:
    """Parameter names of the generator EMA saved in ``checkpoint`` (empty: the run had ``optim.ema_decay = 0``).

    Read from the DCP metadata only (keys ``trainer.ema.<name>``), no tensor data.
    """
    from dmdr.distributed.checkpoint import dcp_error_line, saved_keys

    try:
        keys = saved_keys(checkpoint)
    except Exception as e:  # noqa: BLE001 - a missing or unreadable .metadata; one line
        raise CheckpointError(f"cannot read the DCP metadata of checkpoint {checkpoint}: {dcp_error_line(e)}") from e
    return sorted(k[len(EMA_PREFIX):] for k in keys if k.startswith(EMA_PREFIX))


def resolve_weights(checkpoint: str | Path, weights: str = "auto", held: list[str] | None = None) -> str:
    """``"ema"`` or ``"trained"``: what ``weights`` (one of :data:`WEIGHTS`) means for ``checkpoint``.

    Args:
        held: :func:`checkpoint_ema_names` of the checkpoint, if already read.

    Raises:
        CheckpointError: ``weights="ema"`` and the checkpoint holds no EMA.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "trained":
        return "trained"
    has_ema = bool(checkpoint_ema_names(checkpoint) if held is None else held)
    if weights == "ema" and not has_ema:
        raise _no_ema(checkpoint)
    return "ema" if has_ema else "trained"


def _no_ema(checkpoint: str | Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {checkpoint} holds no EMA of the generator: the run had optim.ema_decay = 0 "
                           "(use --weights trained or auto)")


class LoadedGenerator(NamedTuple):
    """What :func:`load_generator` returns."""

    backbone: Any
    roles: Any
    """:class:`~dmdr.trainer.Roles`; ``roles.generator`` holds the chosen weights."""
    weights: str
    """The weights loaded into the generator's trainable parameters: ``"ema"`` or ``"trained"``."""


def _dcp_read(state: dict[str, Any], checkpoint: str | Path, what: str) -> None:
    """``dcp.load`` in one process (``no_dist``) into ``state``; any failure becomes one :class:`CheckpointError`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from dmdr.distributed.checkpoint import raise_dcp_error
    from dmdr.distributed.safe_load import SafeFileSystemReader, safe_planner

    try:
        with warnings.catch_warnings():  # DCP warns that it "assumes" one process even with no_dist
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(checkpoint), storage_reader=SafeFileSystemReader(str(checkpoint)),
                     planner=safe_planner(checkpoint), no_dist=True)
    # DCP wraps per-rank failures in CheckpointException, a BaseException (not caught by `except Exception`)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - the user gets one line
        raise_dcp_error(e, f"cannot read {what} from {checkpoint}")


@torch.no_grad()
def load_ema(roles: Any, checkpoint: str | Path, held: list[str] | None = None) -> None:
    """Replace the generator's trainable parameters with the EMA saved in ``checkpoint`` (in place).

    The tensors ``trainer.ema.<name>`` are read for the names of :meth:`~dmdr.trainer.Roles.generator_param_names`
    into tensors shaped like the parameters, then copied into them.
    """
    names = roles.generator_param_names()
    held = set(checkpoint_ema_names(checkpoint) if held is None else held)
    if not held:
        raise _no_ema(checkpoint)
    missing = [n for n in names if n not in held]
    if missing:
        example = sorted(held)[0]
        raise CheckpointError(f"the EMA in checkpoint {checkpoint} does not match this generator: no EMA of "
                              f"{missing[0]!r} ({len(missing)} of {len(names)} parameters missing; it holds e.g. "
                              f"{example!r}); use --weights trained")
    ema = {n: torch.empty_like(p.detach()) for n, p in zip(names, roles.generator_params)}
    _dcp_read({"trainer": {"ema": ema}}, checkpoint, "the generator's EMA")
    for n, p in zip(names, roles.generator_params):
        p.copy_(ema[n])


def load_generator(cfg: TrainConfig, checkpoint: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None, load_text_encoder: bool = True,
                   weights: str = "auto") -> LoadedGenerator:
    """The backbone and :class:`~dmdr.trainer.Roles` of a run, with the generator's weights from ``checkpoint``.

    Built by the trainer's own path (:func:`dmdr.models.load_backbone`, :func:`dmdr.build.build_roles`,
    :func:`dmdr.build.collect_roles`) in one process; only the generator's tensors are read (the generator
    LoRA of entry ``models``, or the full copy of entry ``generator``, and with ``weights="ema"`` the
    EMA of entry ``trainer``), not the optimizer states or the critic.

    Args:
        dtype: storage dtype of the teacher's weights; default the run's ``model.dtype``.
        weights: ``"trained"``, ``"ema"`` or ``"auto"`` (EMA when the checkpoint holds one), see the module doc.

    Returns:
        ``(backbone, roles, weights)`` (:class:`LoadedGenerator`), ``weights`` the ones loaded (``ema`` / ``trained``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from dmdr.build import DTYPES, build_roles, collect_roles
    from dmdr.distributed.checkpoint import read_marker
    from dmdr.models import GENERATOR, load_backbone
    from dmdr.provenance import check_export_source

    check_export_source(cfg, checkpoint)  # another family / mode / teacher, or a non-plain pickle: refused first
    m = cfg.model
    entry = "models" if m.generator_mode == "lora" else "generator"  # DMDRTrainer.app_state's names
    held = read_marker(checkpoint).get("entries", {})
    if entry not in held:
        raise CheckpointError(f"checkpoint {checkpoint} has no entry {entry!r} (it holds {', '.join(sorted(held))}); "
                              f"it was not written with model.generator_mode={m.generator_mode}")
    ema_names = checkpoint_ema_names(checkpoint) if weights != "trained" else []
    used = resolve_weights(checkpoint, weights, held=ema_names)  # before the slow part: a bad choice fails fast
    backbone = load_backbone(m.path, family=m.family, dtype=dtype or DTYPES[m.dtype], device=device,
                             load_text_encoder=load_text_encoder, t_min=cfg.dmd.t_min,
                             max_sequence_length=m.max_sequence_length)
    generator, adapter = build_roles(cfg, backbone)
    roles = collect_roles(generator, backbone.teacher, adapter)
    model = backbone.teacher if adapter is not None else generator
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=adapter is not None))
    if adapter is not None:
        state = {k: v for k, v in state.items() if k.endswith(f".{GENERATOR}")}
    _dcp_read({entry: {"model": state}}, checkpoint, "the generator")
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    if used == "ema":
        load_ema(roles, checkpoint, held=ema_names)
    return LoadedGenerator(backbone, roles, used)


# ----------------------------------------------------------------------------------------------- export
@torch.no_grad()
def export_transformer(roles: Any, dtype: torch.dtype) -> nn.Module:
    """The generator as a plain diffusers transformer in ``dtype``: generator LoRA merged (scale 1.0), no LoRA left.

    LoRA mode folds ``alpha/r * B A`` of adapter ``generator`` into the teacher's base weights
    (:func:`~dmdr.models.lora.merge_adapter`, computed in fp32 when the base is fp32) and swaps every
    LoRA-wrapped linear back to its base linear, so the critic adapter is dropped. Full mode takes the
    full copy. The network is modified in place.
    """
    from dmdr.models import GENERATOR
    from dmdr.models.lora import lora_layers, merge_adapter

    net = roles.generator.net
    if roles.shared_base:
        merge_adapter(net, GENERATOR, scale=1.0)
    for name, layer in list(lora_layers(net)):
        net.set_submodule(name, layer.base)
    nn.Module.to(net, dtype)  # not ModelMixin.to, which warns on dtype casts
    return net


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Refuse a non-empty ``out``, unless ``overwrite`` and it is an earlier export (call before any slow work)."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if not (out / SETTINGS_FILE).is_file():
        raise ConfigError(f"--out {out} is not a folder written by this exporter (no {SETTINGS_FILE}); "
                          "refusing to delete it, choose another --out")


def write_folder(out: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write an export folder ``out`` through ``fill(tmp)``: into a temporary sibling, then renamed into place.

    So ``out`` is never half-written; an earlier export there is replaced only with ``overwrite``
    (:func:`check_output`). Disk and permission errors become one :class:`ConfigError` line.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: one line naming the file
            raise ConfigError(f"cannot write the export to {out}: {e.strerror or e} ({e.filename or tmp})") from None
        raise
    return out


def write_common(folder: Path, settings: InferenceSettings, teacher_scheduler: dict[str, Any] | None,
                 provenance: dict[str, Any], readme: str, base: str | Path) -> None:
    """What every export form holds: the few-step ``scheduler/``, :data:`SETTINGS_FILE`, the model card, and the
    base model's licence file when its card links one (:func:`dmdr.model_card.copy_licence`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    from dmdr.model_card import copy_licence

    if settings.epsilon:
        scheduler = LCMScheduler.from_config(lcm_scheduler_config(teacher_scheduler))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(teacher_scheduler))
    scheduler.save_pretrained(folder / "scheduler")
    meta = {**settings.to_json(), "source": provenance}
    (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(readme)
    copy_licence(base, folder)


def write_pipeline(source: str | Path, out: str | Path, transformer: nn.Module, settings: InferenceSettings,
                   teacher_scheduler: dict[str, Any] | None, provenance: dict[str, Any], readme: str,
                   overwrite: bool = False) -> Path:
    """Write the exported pipeline folder ``out``: the teacher's ``model_index.json`` and the other components it
    lists, copied as they are; the distilled denoiser (``transformer/``, SDXL ``unet/``); the few-step
    ``scheduler/``; :data:`SETTINGS_FILE`; ``readme`` (:func:`dmdr.model_card.render`) as README.md. Atomic
    (:func:`write_folder`).
    """
    source = Path(source)
    denoiser = settings.denoiser_component

    def fill(tmp: Path) -> None:
        index = json.loads((source / "model_index.json").read_text())
        # Only the components the pipeline lists: hub folders also hold single-file checkpoints and the like.
        for name, entry in index.items():
            listed = isinstance(entry, list) and len(entry) == 2 and None not in entry
            if listed and name not in (denoiser, "scheduler") and (source / name).is_dir():
                shutil.copytree(source / name, tmp / name)
        transformer.save_pretrained(tmp / denoiser, safe_serialization=True)
        index["scheduler"] = ["diffusers", settings.scheduler_class]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_common(tmp, settings, teacher_scheduler, provenance, readme, source)

    return write_folder(out, fill, overwrite)
