"""Release a trained generator: a stock diffusers pipeline folder that reproduces dmdr's few-step sampler, a
diffusers LoRA file, or one single-file transformer, each with its model card; and loading any of them back.

Library side of ``tools/convert_to_diffusers.py`` and ``tools/sample.py``. The reasoning (the schedule mapping,
which weights, the LoRA key format, the card) is in ``dmdr/export/README.md``.

* :mod:`~dmdr.export.generator`: a run's generator rebuilt from a checkpoint as training built it
  (:func:`load_generator`, ``trained`` / ``ema`` weights) and folded into a plain network (:func:`export_transformer`);
* :mod:`~dmdr.export.settings`: how to call the exported pipeline (:class:`InferenceSettings`) and its scheduler;
* :mod:`~dmdr.export.pipeline`: writing a folder atomically, what every form holds, the merged pipeline form;
* :mod:`~dmdr.export.release`: the LoRA (with SVD extraction from a full-mode run) and single-file forms;
* :mod:`~dmdr.export.card`: the model card (``README.md``);
* :mod:`~dmdr.export.load`: any form loaded back as its card loads it (:func:`load_release`).
"""

from dmdr.export import card, release
from dmdr.export.generator import (
    EMA_PREFIX,
    WEIGHTS,
    LoadedGenerator,
    checkpoint_ema_names,
    export_transformer,
    load_ema,
    load_generator,
    read_run_config,
    resolve_checkpoint,
    resolve_weights,
)
from dmdr.export.load import load_release
from dmdr.export.pipeline import check_output, write_common, write_folder, write_pipeline
from dmdr.export.settings import (
    NUM_TRAIN_TIMESTEPS,
    SETTINGS_FILE,
    InferenceSettings,
    StopAfterSteps,
    lcm_scheduler_config,
    scheduler_config,
)

__all__ = [
    "card", "release", "EMA_PREFIX", "WEIGHTS", "LoadedGenerator", "checkpoint_ema_names", "export_transformer",
    "load_ema", "load_generator", "read_run_config", "resolve_checkpoint", "resolve_weights", "load_release",
    "check_output", "write_common", "write_folder", "write_pipeline", "NUM_TRAIN_TIMESTEPS", "SETTINGS_FILE",
    "InferenceSettings", "StopAfterSteps", "lcm_scheduler_config", "scheduler_config",
]
