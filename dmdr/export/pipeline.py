"""Writing an export folder: atomically (:func:`write_folder`), with what every form holds (:func:`write_common`),
and the merged pipeline form (:func:`write_pipeline`; the LoRA and single-file forms: :mod:`dmdr.export.release`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dmdr.errors import ConfigError
from dmdr.export.card import copy_licence
from dmdr.export.settings import (
    SETTINGS_FILE,
    InferenceSettings,
    base_scheduler_sigmas,
    lcm_scheduler_config,
    scheduler_config,
)
from dmdr.permissions import respect_umask


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
    (:func:`check_output`). Disk and permission errors become one :class:`ConfigError` line. Every file
    gets the mode the umask allows (safetensors alone would leave the weights 0600, unreadable by the group).
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        respect_umask(tmp)
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
    base model's licence file when its card links one (:func:`dmdr.export.card.copy_licence`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if settings.epsilon:
        scheduler = LCMScheduler.from_config(lcm_scheduler_config(teacher_scheduler))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(teacher_scheduler))
    scheduler.save_pretrained(folder / "scheduler")
    meta = {**settings.to_json(), "source": provenance}
    own = base_scheduler_sigmas(settings, teacher_scheduler)
    if own is not None:  # the LoRA form on the base pipeline with its own scheduler (no scheduler swap)
        meta["base_scheduler"] = own
    (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(readme)
    copy_licence(base, folder)


def write_pipeline(source: str | Path, out: str | Path, transformer: nn.Module, settings: InferenceSettings,
                   teacher_scheduler: dict[str, Any] | None, provenance: dict[str, Any], readme: str,
                   overwrite: bool = False) -> Path:
    """Write the exported pipeline folder ``out``: the teacher's ``model_index.json`` and the other components it
    lists, copied as they are; the distilled denoiser (``transformer/``, SDXL ``unet/``); the few-step
    ``scheduler/``; :data:`SETTINGS_FILE`; ``readme`` (:func:`dmdr.export.card.render`) as README.md. Atomic
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
