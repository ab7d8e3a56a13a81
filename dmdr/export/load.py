"""Loading an export folder of any form (merged pipeline, LoRA, single file) as its model card does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdr.devices import DTYPES
from dmdr.errors import ConfigError, UserError
from dmdr.export.settings import SETTINGS_FILE, InferenceSettings


def load_release(folder: str | Path, base: str | Path = "") -> object:
    """The stock diffusers pipeline of an export folder of any form, as its model card loads it.

    ``pipeline``: ``from_pretrained(folder)``. ``lora``: the base pipeline (``base``, default the run's teacher
    recorded in ``dmdr_inference.json``), ``load_lora_weights(folder)`` and the folder's few-step scheduler.
    ``single-file``: the transformer by ``from_single_file(config=base)`` into the base pipeline, same scheduler.
    """
    import diffusers  # heavy: imported when an export is loaded
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    settings = InferenceSettings.read(folder)  # one line if this is not an export
    source = json.loads((folder / SETTINGS_FILE).read_text()).get("source", {})
    form, files = source.get("form", "pipeline"), source.get("files", {})
    base = Path(base or source.get("teacher", ""))
    if form != "pipeline" and not (base / "model_index.json").is_file():
        raise ConfigError(f"{folder} is a {form} export of the base pipeline {str(base)!r}, which is not a diffusers "
                          "folder here; pass the base folder (--model-path)")
    try:
        if form == "pipeline":
            return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        kwargs = {}
        if form == "single-file":  # the whole pipeline in the file's dtype, as the card calls it
            kwargs["dtype"] = DTYPES.get(source.get("dtype"), torch.float32)
            model_class = getattr(diffusers, settings.family.single_file_class)
            kwargs["transformer"] = model_class.from_single_file(
                str(folder / files["single_file"]), config=str(base), subfolder="transformer", local_files_only=True,
                dtype=kwargs["dtype"])
        pipe = DiffusionPipeline.from_pretrained(str(base), local_files_only=True, **kwargs)
        if form == "lora":
            pipe.load_lora_weights(str(folder))
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
        return pipe
    except Exception as e:  # noqa: BLE001 - any failure here is a bad folder, reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder}: cannot load the {form} export ({first[:300]})") from e
