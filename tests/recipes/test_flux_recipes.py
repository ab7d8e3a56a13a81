"""The FLUX recipes: built on the shared base's SD3.5-Large row, with the FLUX-specific values their docstrings
source (the pipelines' shifts, guidance and text lengths), and launchable by name and by path."""

from __future__ import annotations

import math
from dataclasses import asdict

from dmdr.recipes import RECIPES
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def _differences(cfg, family: str) -> dict:
    base = asdict(big_model_recipe(family, SD35_LARGE, cfg.train.output_dir))
    got = asdict(cfg)
    return {f"{s}.{k}": v for s in got for k, v in got[s].items() if base[s][k] != v}


def test_flux_recipe_states_only_the_flux_values():
    cfg = RECIPES["flux_dmdr"].config()
    assert _differences(cfg, "flux") == {"model.max_sequence_length": 512, "dmd.shift": 3.16, "dmd.guidance": 3.5}
    assert cfg.dmd.generator_guidance == 3.5 and cfg.dmd.true_cfg == 1.0
    # FLUX.1-dev's scheduler at 1024 px: mu = max_shift 1.15 at 4096 tokens; exponential shift = exp(mu)
    assert abs(cfg.dmd.shift - math.exp(1.15)) < 0.01


def test_flux2_recipe_states_only_the_flux2_values():
    cfg = RECIPES["flux2_dmdr"].config()
    assert _differences(cfg, "flux2") == {"model.max_sequence_length": 512, "dmd.shift": 9.89}
    assert cfg.dmd.guidance == 4.0
    # Flux2KleinPipeline's compute_empirical_mu at 4096 image tokens and 4 steps
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert abs(cfg.dmd.shift - math.exp(compute_empirical_mu(4096, 4))) < 0.01
