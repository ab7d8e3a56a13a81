"""Shared fixtures for end-to-end runs: one tiny SD3 folder and one prompt file per session."""

from __future__ import annotations

import pytest
from tiny_helpers import load_recipe


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    from dmdr.models.tiny import build_tiny_sd3

    root = tmp_path_factory.mktemp("tiny-assets")
    model = build_tiny_sd3(root / "tiny-sd3", seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(load_recipe("tiny_dmdr").DEMO_PROMPTS) + "\n")
    return {"model": str(model), "prompts": str(prompts)}
