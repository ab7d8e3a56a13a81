"""What a checkpoint was trained from: model family, generator mode and a fingerprint of the teacher's weights.

Every checkpoint's ``COMPLETE.json`` holds this record (key :data:`RECORD_KEY`, from :func:`run_record`);
resume (:meth:`dmdr.distributed.checkpoint.CheckpointManager.load`) and export
(:func:`dmdr.export.generator.check_export_source`) compare it with the current config before any weights load
and refuse a difference in one line naming the setting, saved vs current (:func:`record_mismatch`).

The teacher fingerprint (:func:`teacher_fingerprint`) is cheap, no full read: SHA-256 over the denoiser's
``transformer/config.json`` (SDXL: ``unet/``), and for each of its safetensors files the header (tensor names,
dtypes, shapes, offsets), the size and three 64 KiB windows of the data (start, middle, end): two fine-tunes of one
architecture have equal headers but not equal bytes. It does not depend on where the folder is, so a
teacher that moved (``--model.path``) still matches.

Checkpoints written before this record existed carry none: they are loaded with a warning (the entry
names and DCP's shape checks still catch most mismatches).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

from dmdr.errors import ModelLoadError
from dmdr.models.loading import detect_family, read_model_index
from dmdr.models.weights import safetensors_files

log = logging.getLogger("dmdr")

RECORD_KEY = "run"
"""Key of the record in a checkpoint's ``COMPLETE.json``."""
_WINDOW = 1 << 16
_DENOISERS = ("transformer", "unet")
_FIELDS = (("family", "model.family"), ("generator_mode", "model.generator_mode"))


def _hash_safetensors(h: Any, file: Path, name: bool = True) -> None:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        start = 8 + n
        if start > size:
            raise ModelLoadError(f"{file} is truncated: its header claims {n} bytes, the file has {size}")
        h.update((file.name.encode() if name else b"") + head + fh.read(n) + size.to_bytes(8, "little"))
        span = size - start
        for at in sorted({start, start + max(0, span // 2 - _WINDOW // 2), max(start, size - _WINDOW)}):
            fh.seek(at)
            h.update(fh.read(_WINDOW))


def teacher_fingerprint(model_path: str | Path) -> str:
    """16 hex digits identifying the teacher denoiser of a diffusers folder (see the module doc)."""
    root = Path(model_path)
    # The denoiser component: ``transformer`` (SD3, Z-Image) or ``unet`` (SDXL), whichever the folder has.
    folder = next((root / name for name in _DENOISERS if (root / name / "config.json").is_file()), root / _DENOISERS[0])
    config = folder / "config.json"
    try:
        h = hashlib.sha256(config.read_bytes())
    except OSError as e:
        raise ModelLoadError(f"cannot read the teacher's {config} ({e.strerror or e})") from None
    for file in sorted(safetensors_files(folder), key=lambda p: p.name):
        _hash_safetensors(h, file)
    return h.hexdigest()[:16]


def adapter_fingerprint(path: str | Path) -> str:
    """16 hex digits identifying a LoRA file (or folder) as :func:`teacher_fingerprint` does; not its name."""
    from dmdr.models.adapters import lora_file

    h = hashlib.sha256()
    _hash_safetensors(h, lora_file(path), name=False)
    return h.hexdigest()[:16]


def adapters_record(cfg: Any) -> list[str]:
    """``<fingerprint>:<scale>`` of each ``model.teacher_adapters`` entry, in order (the teacher they make)."""
    from dmdr.models.adapters import AdapterSpec

    specs = [AdapterSpec.parse(text) for text in getattr(cfg.model, "teacher_adapters", ())]
    return [f"{adapter_fingerprint(s.path)}:{s.scale:g}" for s in specs]


def run_record(cfg: Any) -> dict[str, Any]:
    """The record of a :class:`~dmdr.config.TrainConfig`: family (resolved from the folder), mode, teacher and the
    teacher's adapters (``model.teacher_adapters``, only when there are some: older records then still match)."""
    m = cfg.model
    family = detect_family(read_model_index(m.path), m.family).name
    record: dict[str, Any] = {"family": family, "generator_mode": m.generator_mode,
                              "teacher": teacher_fingerprint(m.path), "teacher_path": str(m.path)}
    adapters = adapters_record(cfg)
    if adapters:
        record["teacher_adapters"] = adapters
        record["teacher_adapter_paths"] = [str(p) for p in m.teacher_adapters]
    if getattr(m, "init_generator", ""):
        record["init_generator"] = str(m.init_generator)  # informative: a resume reads its checkpoint instead
    return record


def record_mismatch(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str | Path) -> str | None:
    """One line naming what differs between ``saved`` (a checkpoint's record) and ``current``, or None.

    ``saved`` None (a checkpoint from before the record existed) logs a warning and passes.
    """
    if not saved:
        log.warning("checkpoint %s records no model family, generator mode or teacher fingerprint (written by an "
                    "older dmdr): not checked, make sure it was trained from this teacher and config", checkpoint)
        return None
    for key, setting in _FIELDS:
        if key in saved and saved[key] != current[key]:
            return (f"checkpoint {checkpoint} was trained with {setting}={saved[key]}, the current config has "
                    f"{setting}={current[key]}")
    if "teacher" in saved and saved["teacher"] != current["teacher"]:
        return (f"checkpoint {checkpoint} was trained from another teacher: {saved.get('teacher_path', '?')} "
                f"(fingerprint {saved['teacher']}) then, model.path {current['teacher_path']} (fingerprint "
                f"{current['teacher']}) now")
    if saved.get("teacher_adapters", []) != current.get("teacher_adapters", []):
        then, now = (",".join(r.get("teacher_adapter_paths", [])) or "(none)" for r in (saved, current))
        return (f"checkpoint {checkpoint} was trained against the teacher with model.teacher_adapters={then} "
                f"(fingerprint:scale {saved.get('teacher_adapters', [])}), the current config has {now} "
                f"({current.get('teacher_adapters', [])})")
    return None


def source_commit() -> str:
    """The short git commit of this source tree, ``+dirty`` if it has uncommitted changes; ``unknown`` outside git.

    Benchmarks and tools write it into their reports, so a number can be traced to the code that made it.
    """
    repo = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
