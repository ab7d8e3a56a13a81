"""Re-turbo: distil a user's fine-tune or LoRA, starting from a few-step student that already exists.

Two settings (``README.md``, "Re-turbo"):

- ``model.teacher_adapters`` (``PATH[:scale]``, comma-separated): LoRAs merged once into the frozen teacher's weights
  at load (:func:`prepare_roles`), after the sharded teacher is materialised (each rank merges its own rows), and
  into a full-copy generator, which starts as a copy of that teacher. In LoRA generator mode the generator shares the
  teacher's (merged) base. Export merges them the same way (:func:`merge_teacher_adapters`), so the merged release
  is base + user adapters + the few-step adapter, and the LoRA release is relative to base + user adapters.
- ``model.init_generator``: the generator's starting weights. A full model (a diffusers pipeline folder, a merged
  export of ours, a transformer folder or single file) replaces a full-copy generator's weights, then the teacher
  adapters are merged into it (a student of the same base plus the user's LoRA is the community's own starting
  point). A few-step LoRA on the base becomes the generator adapter's first weights in LoRA mode (its rank must be
  ``model.generator_lora_rank``), or is merged into a full-copy generator. A resumed run reads its checkpoint and
  ignores the init.

The checkpoint record (:mod:`dmdr.provenance`) holds a fingerprint of every teacher adapter and its scale, so a resume
or export with other adapters is refused. The preflight (:mod:`dmdr.preflight.run_checks`) reads every file here
before any model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmdr.devices import DTYPES
from dmdr.errors import ModelLoadError
from dmdr.models.adapters import (
    AdapterSpec,
    LoraDelta,
    is_lora_state,
    lora_rank,
    merge_loras,
    read_lora,
    set_adapter,
    weight_shapes,
)
from dmdr.models.families import family_spec
from dmdr.models.family import FamilySpec
from dmdr.models.folder import read_model_index
from dmdr.models.loading import detect_family
from dmdr.models.lora import _matches
from dmdr.models.roles import GENERATOR
from dmdr.models.weights import safetensors_files

log = logging.getLogger("dmdr")

ADAPTERS_SETTING = "model.teacher_adapters"
INIT_SETTING = "model.init_generator"


def adapter_specs(cfg: Any) -> list[AdapterSpec]:
    return [AdapterSpec.parse(text) for text in cfg.model.teacher_adapters]


def _headers(files: list[Path]) -> list[dict[str, Any]]:
    from dmdr.preflight.files import safetensors_header

    out = []
    for f in files:
        try:
            out.append(safetensors_header(f))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{f}: {e}") from None
    return out


def teacher_family(cfg: Any) -> FamilySpec:
    return detect_family(read_model_index(cfg.model.path), cfg.model.family)


def denoiser_shapes(model_path: str | Path, family: FamilySpec) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of the denoiser of a pipeline folder, from its safetensors headers (no data)."""
    return weight_shapes(_headers(safetensors_files(Path(model_path) / family.denoiser_component)))


def teacher_loras(cfg: Any, family: FamilySpec, shapes: dict[str, tuple[int, ...]] | None = None) \
        -> list[tuple[LoraDelta, float]]:
    """Every ``model.teacher_adapters`` LoRA, read and checked against the teacher, with its scale."""
    specs = adapter_specs(cfg)
    if not specs:
        return []
    return read_adapters(specs, family, shapes if shapes is not None else denoiser_shapes(cfg.model.path, family))


def read_adapters(specs: list[AdapterSpec], family: FamilySpec, shapes: dict[str, tuple[int, ...]]) \
        -> list[tuple[LoraDelta, float]]:
    return [(read_lora(s.path, shapes, pipeline_class=family.pipeline_class, what=f"--{ADAPTERS_SETTING}"), s.scale)
            for s in specs]


@dataclass
class InitSource:
    """What ``model.init_generator`` points at: a full model's weight files, or a LoRA."""

    path: str
    files: list[Path] = field(default_factory=list)
    lora: LoraDelta | None = None


def _model_files(path: Path, family: FamilySpec) -> list[Path] | None:
    """The denoiser weight files of a full model at ``path``, or None when ``path`` is a LoRA."""
    if path.is_file():
        from dmdr.preflight.files import safetensors_header

        try:
            keys = safetensors_header(path).keys()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"--{INIT_SETTING} {path}: {e}") from None
        return None if is_lora_state(keys) else [path]
    if (path / "model_index.json").is_file():
        folder = read_model_index(path)
        if folder.pipeline_class != family.pipeline_class:
            raise ModelLoadError(f"--{INIT_SETTING} {path} is a {folder.pipeline_class} folder, the teacher a "
                                 f"{family.pipeline_class}: a student of another model family")
        return safetensors_files(path / family.denoiser_component)
    if (path / "config.json").is_file() and not (path / "pytorch_lora_weights.safetensors").is_file():
        return safetensors_files(path)
    return None


def read_init(cfg: Any, family: FamilySpec, shapes: dict[str, tuple[int, ...]] | None = None) -> InitSource | None:
    """``model.init_generator`` read and checked against the teacher and the generator mode (None when unset).

    Raises:
        ModelLoadError: one line naming the path: missing, another architecture, a full model for a LoRA generator,
            a LoRA of another rank than ``model.generator_lora_rank``.
    """
    m = cfg.model
    if not m.init_generator:
        return None
    path = Path(m.init_generator)
    if not path.exists():
        raise ModelLoadError(f"--{INIT_SETTING} {path} does not exist")
    shapes = shapes if shapes is not None else denoiser_shapes(m.path, family)
    files = _model_files(path, family)
    if files is not None:
        if m.generator_mode == "lora":
            raise ModelLoadError(f"--{INIT_SETTING} {path} is a full model, the generator a LoRA: give the student's "
                                 "few-step LoRA (tools/convert_to_diffusers.py --lora [--lora-rank R] writes one) or "
                                 "set --model.generator_mode full")
        theirs = weight_shapes(_headers(files))
        wrong = next((n for n, s in shapes.items() if theirs.get(n) != s), None)
        if wrong is not None:
            got = list(theirs[wrong]) if wrong in theirs else "nothing"
            raise ModelLoadError(f"--{INIT_SETTING} {path} is not a model of the teacher's architecture: layer {wrong} "
                                 f"is {list(shapes[wrong])} in the teacher, {got} there")
        return InitSource(str(path), files=files)
    lora = read_lora(path, shapes, pipeline_class=family.pipeline_class, what=f"--{INIT_SETTING}")
    if m.generator_mode == "lora":
        try:
            rank = lora_rank(lora)
        except ModelLoadError as e:
            raise ModelLoadError(f"--{INIT_SETTING} {path}: {e}") from None
        if rank != m.generator_lora_rank:
            raise ModelLoadError(f"--{INIT_SETTING} {path} has rank {rank}, the generator adapter rank "
                                 f"{m.generator_lora_rank}: set --model.generator_lora_rank {rank} (the LoRA's scale "
                                 "is kept whatever --model.generator_lora_alpha is)")
        targets = tuple(m.lora_targets) or family.lora_targets
        outside = sorted(n for n in lora if not _matches(n, targets))
        if outside:
            raise ModelLoadError(f"--{INIT_SETTING} {path} adapts layer {outside[0]} ({len(outside)} in all), which "
                                 f"--model.lora_targets {','.join(targets)} leave out: add them to the targets")
    return InitSource(str(path), lora=lora)


def merge_teacher_adapters(cfg: Any, family: FamilySpec, teacher_net: torch.nn.Module) -> int:
    """Merge ``model.teacher_adapters`` into the teacher's network (its local shards when sharded)."""
    loras = teacher_loras(cfg, family)
    if not loras:
        return 0
    n = merge_loras(teacher_net, loras, round_via=DTYPES[cfg.model.dtype])
    log.info("teacher adapters merged into %d layers: %s", n, ", ".join(map(str, adapter_specs(cfg))))
    return n


def prepare_roles(cfg: Any, backbone: Any, generator: Any, adapter: str | None, device: torch.device) -> None:
    """After the roles are built (and materialised when sharded): the teacher adapters and the generator's init.

    Order for a full-copy generator: its weights (the teacher's, or ``model.init_generator``'s), then the teacher
    adapters and an init LoRA merged in one rounding. A LoRA generator shares the merged teacher base; an init LoRA
    becomes its adapter's weights.
    """
    from dmdr.distributed import materialize_from_safetensors

    family = family_spec(backbone.family)
    shapes = denoiser_shapes(cfg.model.path, family) if (cfg.model.teacher_adapters or cfg.model.init_generator) \
        else {}
    loras = teacher_loras(cfg, family, shapes)
    init = read_init(cfg, family, shapes)
    if loras:
        merge_loras(backbone.teacher.net, loras, round_via=DTYPES[cfg.model.dtype])
        log.info("teacher adapters merged: %s", ", ".join(map(str, adapter_specs(cfg))))
    if adapter is None:
        if init is not None and init.files:
            # The student's own values, not rounded through the teacher's dtype.
            materialize_from_safetensors(generator, init.files, device=device, prefix="net.")
        extra = [(init.lora, 1.0)] if init is not None and init.lora is not None else []
        if loras or extra:
            from_teacher = init is None or not init.files
            merge_loras(generator.net, loras + extra, round_via=DTYPES[cfg.model.dtype] if from_teacher else None)
    elif init is not None and init.lora is not None:
        set_adapter(backbone.teacher.net, GENERATOR, init.lora, what=f"--{INIT_SETTING} {init.path}")
    if init is not None:
        log.info("generator initialised from %s (%s)", init.path, "LoRA" if init.lora is not None else "full model")
