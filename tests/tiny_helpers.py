"""Helpers of the tests that run the tiny recipe (e2e, evaluation, devices): a recipe module, the tiny recipe's
config on test assets, the tools as modules and as scripts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    """The module of recipe ``name`` (:mod:`dmdr.recipes.<name>`)."""
    return importlib.import_module(f"dmdr.recipes.{name}")


def tiny_config(assets: dict[str, str], output_dir: Path, **overrides: str):
    """The tiny recipe's config on the shared assets, quick settings, plus ``section__field=value`` overrides."""
    from dmdr.config import apply_overrides

    cfg = load_recipe("tiny_dmdr").tiny_dmdr()
    argv = ["--model.path", assets["model"], "--data.sources", assets["prompts"],
            "--train.output_dir", str(output_dir), "--log.progress_bar", "false", "--log.tensorboard", "false",
            "--dmd.ratio", "2", "--train.max_steps", "8", "--rl.start_step", "4", "--dynamic.decay_steps", "4",
            "--checkpoint.interval", "4", "--log.interval", "1", "--log.sample_interval", "0"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('__', '.')}", str(value)]
    return apply_overrides(cfg, argv)


def tool(name: str):
    """The module of ``tools/<name>.py`` (:mod:`dmdr.cli.<name>`)."""
    return importlib.import_module(f"dmdr.cli.{name}")


def script(name: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``tools/<name>.py`` as a user does (a fresh interpreter, the repo not on ``PYTHONPATH``)."""
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def one_error_line(err: str, needle: str) -> None:
    """``err`` holds exactly one ``error:`` line, containing ``needle``, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    assert "Traceback" not in err
