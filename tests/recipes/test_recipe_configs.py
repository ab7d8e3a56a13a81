"""Every recipe's full config, pinned to the values it had before the recipes shared ``dmdr/recipes/base.py``.

``recipe_configs.json`` holds each pinned recipe's ``asdict(config())`` as the recipes produced it at commit 727f208
(each recipe spelling out all its settings). A field added to :class:`TrainConfig` after that must stay at its
default in every pinned recipe; a new recipe may add its own entry.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from dmdr.config import TrainConfig
from dmdr.recipes import RECIPES
from dmdr.recipes.shapes_dmdr import REPO

PINNED = json.loads(Path(__file__).with_name("recipe_configs.json").read_text())
REPO_MARK = "<repo>"
"""Stands for the checkout in pinned paths (the shapes recipe's teacher lives in it)."""


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"model.family": ..., ...}`` from the nested dict, JSON-typed (tuples as lists), the checkout as REPO_MARK."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            if isinstance(value, str) and value.startswith(str(REPO)):
                value = REPO_MARK + value[len(str(REPO)):]
            out[prefix + key] = value
    return out


def _config_fields(cfg: TrainConfig) -> dict:
    return _flat(json.loads(json.dumps(asdict(cfg))))


def test_every_pinned_recipe_is_registered():
    assert set(PINNED) <= set(RECIPES), f"pinned but not in RECIPES: {sorted(set(PINNED) - set(RECIPES))}"
    assert {"sd35_dmdr", "sd3m_dmdr", "zimage_dmdr", "sdxl_dmdr", "shapes_dmdr", "tiny_dmdr"} <= set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_recipe_config_equals_pinned(name):
    got = _config_fields(RECIPES[name].config())
    pinned = _flat(PINNED[name])
    defaults = _config_fields(TrainConfig())
    assert set(pinned) <= set(got), f"{name}: fields gone from TrainConfig: {sorted(set(pinned) - set(got))}"
    moved = {key: (value, pinned.get(key, defaults[key])) for key, value in got.items()
             if value != pinned.get(key, defaults[key]) or type(value) is not type(pinned.get(key, defaults[key]))}
    assert not moved, f"{name}: fields moved (now, pinned): {moved}"
