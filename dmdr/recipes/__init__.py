"""Recipes: a function returning a :class:`~dmdr.config.TrainConfig` (and optionally one that prepares its
assets), registered by name. ``recipes/<name>.py`` launches one (``torchrun recipes/sd35_dmdr.py ...``);
``tools/plan.py --recipe <name>`` plans one; tests and benchmarks import them from here.

Re-turbo with any recipe (a user's LoRA or fine-tune made few-step again, README "Re-turbo"): add
``--model.teacher_adapters LORA[:scale]`` (or point ``--model.path`` at the fine-tune) and
``--model.init_generator <a few-step LoRA or model>``; a student that is already few-step needs no cold start:
``--dynamic.dynadg false --rl.start_step 0`` skips it (RL from the first step), ``--dynamic.decay_steps K
--rl.start_step K`` with K about a tenth of the recipe's shortens it.

Adding a recipe: a module in this package and one :class:`Recipe` line in :data:`RECIPES`; a launcher in
``recipes/`` if users should run it by path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dmdr.config import TrainConfig
from dmdr.errors import ConfigError
from dmdr.launch import main
from dmdr.recipes import (
    flux2_dmdr,
    flux_dmdr,
    qwenimage_dmdr,
    sd3m_dmdr,
    sd35_dmdr,
    sdxl_dmdr,
    shapes_dmdr,
    tiny_dmdr,
    zimage_dmdr,
)


@dataclass(frozen=True)
class Recipe:
    name: str
    config: Callable[[], TrainConfig]
    """The recipe's config, before command-line overrides."""
    prepare: Callable[[TrainConfig], None] | None = None
    """Runs after the overrides and before preflight: writes the recipe's own assets on first use."""


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("sd35_dmdr", sd35_dmdr.sd35_dmdr),
    Recipe("sd3m_dmdr", sd3m_dmdr.sd3m_dmdr),
    Recipe("zimage_dmdr", zimage_dmdr.zimage_dmdr),
    Recipe("sdxl_dmdr", sdxl_dmdr.sdxl_dmdr),
    Recipe("shapes_dmdr", shapes_dmdr.shapes_dmdr, shapes_dmdr.prepare_assets),
    Recipe("tiny_dmdr", tiny_dmdr.tiny_dmdr, tiny_dmdr.prepare_assets),
    Recipe("flux_dmdr", flux_dmdr.flux_dmdr),
    Recipe("flux2_dmdr", flux2_dmdr.flux2_dmdr),
    Recipe("qwenimage_dmdr", qwenimage_dmdr.qwenimage_dmdr),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; an unknown name is a one-line :class:`ConfigError` listing the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"--recipe {name!r} is not a recipe; known: {', '.join(sorted(RECIPES))}") from None


def run(name: str, argv: list[str] | None = None) -> int:
    """Launch recipe ``name`` with command-line overrides (:func:`dmdr.launch.main`); the process exit code."""
    recipe = get_recipe(name)
    return main(recipe.config, argv, prepare=recipe.prepare)
