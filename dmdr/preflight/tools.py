"""Preflight for the tools: their paths checked with the run checks' building blocks, all problems at once.

Each function takes the tool's parsed arguments and returns every :class:`~dmdr.preflight.Problem`
(settings are the tools' flags: ``--run``, ``--step``, ``--out`` ...); the tool raises them with
:func:`~dmdr.preflight.raise_problems` before it loads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmdr.config import from_dict
from dmdr.distributed.checkpoint import CheckpointManager, read_marker, verify_checkpoint
from dmdr.errors import UserError
from dmdr.export import SETTINGS_FILE, InferenceSettings, check_output, resolve_weights
from dmdr.models.loading import read_model_index
from dmdr.preflight import Problem, problem_from
from dmdr.preflight.files import writable_problem
from dmdr.preflight.run_checks import checkpoint_problems, model_problems, source_problems


def _checkpoint(run: Path, step: str) -> tuple[Path | None, list[Problem]]:
    """The checkpoint ``--step`` names in a run (``latest``: the newest complete one), by sizes only."""
    manager = CheckpointManager(run)
    if str(step) == "latest":
        found = next((p for p in manager.checkpoints() if verify_checkpoint(p) is None), None)
        if found is None:
            return None, [Problem("step", "latest", f"no complete checkpoint in {manager.root} (train longer, or "
                                                    "check the run folder)")]
        return found, []
    try:
        path = manager.step_dir(int(step))
    except ValueError:
        return None, [Problem("step", step, "give a generator step number or 'latest'")]
    if not path.is_dir():
        have = ", ".join(p.name for p in manager.checkpoints()) or "none"
        return None, [Problem("step", step, f"no checkpoint {path} (have: {have})")]
    problems = checkpoint_problems(path, "step")
    return (None if problems else path), problems


def run_problems(run: str, step: str, model_path: str, weights: str = "auto",
                 text_encoder: bool = True) -> list[Problem]:
    """A training run folder as the export and sampling tools read it: config, teacher folder, checkpoint, EMA."""
    folder = Path(run)
    if not folder.is_dir():
        return [Problem("run", run, "does not exist (pass the training run's train.output_dir)")]
    if teacher := teacher_folder_problem("run", run):
        return [teacher]
    file = folder / "config.json"
    try:
        import json

        cfg = from_dict(json.loads(file.read_text()))
    except (OSError, ValueError) as e:
        return [Problem("run", run, f"{file} is missing or not valid JSON ({e}); is it a dmdr run folder?")]
    except UserError as e:
        return [Problem("run", run, f"{file}: {e}")]
    teacher = model_path or cfg.model.path
    problems = []
    if not model_path and not (Path(teacher) / "model_index.json").is_file():
        problems.append(Problem("model-path", "", f"the run's teacher folder {teacher!r} (model.path in {file}) is "
                                                  "gone or not a diffusers pipeline folder; pass --model-path to its "
                                                  "current location"))
    else:
        problems += model_problems(teacher, cfg.model.family, setting="model-path" if model_path else "run",
                                   family_setting="model-path", text_encoder=text_encoder)
    checkpoint, found = _checkpoint(folder, step)
    problems += found
    if checkpoint is None:
        return problems
    entry = "models" if cfg.model.generator_mode == "lora" else "generator"
    held = read_marker(checkpoint).get("entries", {})
    if entry not in held:
        problems.append(Problem("step", step, f"checkpoint {checkpoint} has no entry {entry!r}; it was not written "
                                              f"with model.generator_mode={cfg.model.generator_mode}"))
    try:
        resolve_weights(checkpoint, weights)
    except UserError as e:
        problems.append(problem_from(e, "weights", weights))
    return problems


def export_problems(args: Any) -> list[Problem]:
    """``tools/convert_to_diffusers.py``: the run, its checkpoint and teacher, and ``--out``."""
    problems = run_problems(args.run, args.step, args.model_path, args.weights, text_encoder=False)
    try:
        check_output(args.out, args.overwrite)
    except UserError as e:
        problems.append(problem_from(e, "out", args.out))
    if reason := writable_problem(args.out):
        problems.append(Problem("out", args.out, reason))
    return problems


TEACHER_INSTEAD = ("is a base diffusers pipeline (a teacher: model_index.json, no {settings}), not a dmdr run or "
                   "export; sample a teacher with tools/eval.py --model {path} (its multi-step CFG sampler, "
                   "--save-images) or diffusers' own pipeline; this tool takes a training run (--run "
                   "<train.output_dir>) or, tools/sample.py, an export (--pipeline <folder written by "
                   "tools/convert_to_diffusers.py>)")


def teacher_folder_problem(flag: str, path: str) -> Problem | None:
    """The one line for a teacher folder given where a run or an export belongs, naming what to use instead."""
    folder = Path(path)
    if (folder / "model_index.json").is_file() and not (folder / SETTINGS_FILE).is_file():
        return Problem(flag, path, TEACHER_INSTEAD.format(settings=SETTINGS_FILE, path=path))
    return None


def pipeline_problems(path: str) -> list[Problem]:
    """An exported folder: a diffusers pipeline with every declared component present and its settings file."""
    import json

    if teacher := teacher_folder_problem("pipeline", path):
        return [teacher]

    try:  # a --lora / --single-file export (dmdr.export.release) has no model_index.json: it loads onto its base
        form = json.loads((Path(path) / SETTINGS_FILE).read_text()).get("source", {}).get("form", "pipeline")
    except (OSError, ValueError, AttributeError):
        form = "pipeline"
    if form != "pipeline":
        try:
            InferenceSettings.read(path)
        except UserError as e:
            return [Problem("pipeline", path, str(e))]
        return []  # dmdr.export.load_release checks the base folder, in one line
    try:
        folder = read_model_index(path)
    except UserError as e:
        return [Problem("pipeline", path, f"{e} (give a folder written by tools/convert_to_diffusers.py)")]
    problems = []
    for name in sorted(k for k in folder.index if not k.startswith("_") and folder.declared(k)):
        try:
            folder.check(name)
        except UserError as e:
            problems.append(Problem("pipeline", path, str(e)))
    try:
        InferenceSettings.read(folder.path)
    except UserError as e:
        problems.append(Problem("pipeline", path, f"{e} (its {SETTINGS_FILE} comes from "
                                                  "tools/convert_to_diffusers.py)"))
    return problems


def sample_problems(args: Any) -> list[Problem]:
    """``tools/sample.py``: the run (or exported pipeline), the prompt file, ``--out``'s folder."""
    if args.run:
        problems = run_problems(args.run, args.step, args.model_path, args.weights, text_encoder=True)
    else:
        problems = pipeline_problems(args.pipeline)
    if args.prompt_file and not Path(args.prompt_file).is_file():
        problems.append(Problem("prompt-file", args.prompt_file, "is not a file (one prompt a line)"))
    if reason := writable_problem(Path(args.out).parent):
        problems.append(Problem("out", args.out, reason))
    if args.nrow < 1:
        problems.append(Problem("nrow", args.nrow, "must be >= 1"))
    return problems


def cache_tool_problems(cfg: Any, out: str, check_model: bool = True) -> list[Problem]:
    """``tools/cache_text_embeddings.py``: the text components of ``model.path``, the sources, the cache folder."""
    problems = []
    if check_model:
        problems += model_problems(cfg.model.path, cfg.model.family, text_encoder=True, denoiser=False)
    problems += source_problems(cfg.data, readers=1)
    if reason := writable_problem(out):
        problems.append(Problem("data.embedding_cache", out, reason))
    return problems
