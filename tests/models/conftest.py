"""Tiny random SD3, Z-Image and SDXL pipeline folders, written once per test session."""

import pytest
import torch

from dmdr.models import load_backbone
from dmdr.models.tiny import build_tiny

# Short texts keep the tiny models fast; equality with the pipelines holds at any length.
MAX_SEQ = {"sd3": 16, "zimage": 64, "sdxl": 77}


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny(family, root / f"tiny-{family}") for family in ("sd3", "zimage", "sdxl")}


@pytest.fixture(scope="session")
def prompts():
    return ["a red cube on a blue floor", "", "a photo of a very long prompt " * 8]


@pytest.fixture(scope="session")
def load(family_paths):
    """``load(family, **kwargs)``: a fresh fp32 backbone of a tiny folder (fresh, so LoRA can be injected)."""

    def _load(family, **kwargs):
        kwargs.setdefault("max_sequence_length", MAX_SEQ[family])
        return load_backbone(family_paths[family], dtype=torch.float32, **kwargs)

    return _load


@pytest.fixture(scope="module", params=["sd3", "zimage"])
def backbone(request, load):
    """A read-only backbone of each family (tests that inject LoRA load their own)."""
    return load(request.param)
