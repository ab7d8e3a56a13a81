"""Helpers for the end-to-end tests: load a recipe module, the tiny recipe's config on test assets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
