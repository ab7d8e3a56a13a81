"""A run's generator rebuilt from a checkpoint exactly as training built it (:func:`load_generator`, with the
``trained`` or ``ema`` weights, see ``dmdr/export/README.md``), and folded into a plain diffusers network
(:func:`export_transformer`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dmdr.build import DTYPES, build_roles, collect_roles
from dmdr.config import TrainConfig, from_dict
from dmdr.distributed.checkpoint import (
    CheckpointManager,
    dcp_error_line,
    raise_dcp_error,
    read_marker,
    saved_keys,
    verify_checkpoint,
)
from dmdr.distributed.offline import check_plain_items
from dmdr.distributed.safe_load import SafeFileSystemReader, safe_planner
from dmdr.errors import CheckpointError, ConfigError, ModelLoadError
from dmdr.models import GENERATOR, Backbone, load_backbone
from dmdr.models.families import family_spec
from dmdr.models.lora import lora_layers, merge_adapter
from dmdr.provenance import RECORD_KEY, record_mismatch, run_record
from dmdr.returbo import merge_teacher_adapters
from dmdr.trainer import Roles

WEIGHTS = ("auto", "ema", "trained")
"""Choices of ``weights`` / ``--weights`` (see ``README.md``)."""
EMA_PREFIX = "trainer.ema."
"""DCP key prefix of the trainer's EMA tensors (:meth:`dmdr.trainer.DMDRTrainer.state_dict`, entry ``trainer``)."""


def check_export_source(cfg: TrainConfig, checkpoint: str | Path) -> None:
    """Export and sampling, before any weights load: refuse ``checkpoint`` when its record differs from the
    run config ``cfg``, or when its non-tensor items are not plain data
    (:func:`~dmdr.distributed.offline.check_plain_items`)."""
    reason = record_mismatch(read_marker(checkpoint).get(RECORD_KEY), run_record(cfg), checkpoint)
    if reason:
        raise CheckpointError(f"{reason}; pass the matching --model-path (or export with the run's own config)")
    check_plain_items(checkpoint)


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

    backbone: Backbone
    roles: Roles
    """:class:`~dmdr.trainer.Roles`; ``roles.generator`` holds the chosen weights."""
    weights: str
    """The weights loaded into the generator's trainable parameters: ``"ema"`` or ``"trained"``."""


def _dcp_read(state: dict[str, object], checkpoint: str | Path, what: str) -> None:
    """``dcp.load`` in one process (``no_dist``) into ``state``; any failure becomes one :class:`CheckpointError`."""
    try:
        with warnings.catch_warnings():  # DCP warns that it "assumes" one process even with no_dist
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(checkpoint), storage_reader=SafeFileSystemReader(str(checkpoint)),
                     planner=safe_planner(checkpoint), no_dist=True)
    # DCP wraps per-rank failures in CheckpointException, a BaseException (not caught by `except Exception`)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - the user gets one line
        raise_dcp_error(e, f"cannot read {what} from {checkpoint}")


@torch.no_grad()
def load_ema(roles: Roles, checkpoint: str | Path, held: list[str] | None = None) -> None:
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
    # The teacher the run trained against (base + model.teacher_adapters): the base of a merged or SVD export.
    merge_teacher_adapters(cfg, family_spec(backbone.family), backbone.teacher.net)
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


@torch.no_grad()
def export_transformer(roles: Roles, dtype: torch.dtype) -> nn.Module:
    """The generator as a plain diffusers transformer in ``dtype``: generator LoRA merged (scale 1.0), no LoRA left.

    LoRA mode folds ``alpha/r * B A`` of adapter ``generator`` into the teacher's base weights
    (:func:`~dmdr.models.lora.merge_adapter`, computed in fp32 when the base is fp32) and swaps every
    LoRA-wrapped linear back to its base linear, so the critic adapter is dropped. Full mode takes the
    full copy. The network is modified in place.
    """
    net = roles.generator.net
    if roles.shared_base:
        merge_adapter(net, GENERATOR, scale=1.0)
    for name, layer in list(lora_layers(net)):
        net.set_submodule(name, layer.base)
    nn.Module.to(net, dtype)  # not ModelMixin.to, which warns on dtype casts
    return net


