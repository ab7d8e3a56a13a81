"""Fixtures for the evaluation tests: the reward tests' tiny CLIP-family checkpoints and the e2e tiny assets.

Both are reused as they are (loaded from their conftest files), so every metric is tested on checkpoints
built and saved exactly like the reward models' (the layouts the real ones ship in).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if str(TESTS / "e2e") not in sys.path:  # tiny_helpers, as tests/e2e imports it
    sys.path.insert(0, str(TESTS / "e2e"))
_rewards = _load("_dmdr_test_reward_fixtures", TESTS / "rewards" / "conftest.py")
_e2e = _load("_dmdr_test_e2e_fixtures", TESTS / "e2e" / "conftest.py")

TINY_ARCH = _rewards.TINY_ARCH
TINY_CFG = _rewards.TINY_CFG
tiny_open_clip = _rewards._tiny_open_clip
tiny_arch = _rewards.tiny_arch
hps_checkpoint = _rewards.hps_checkpoint
clip_folder = _rewards.clip_folder
pickscore_folder = _rewards.pickscore_folder
tiny_assets = _e2e.tiny_assets


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    """The tiny open_clip architecture's config (what ``tiny_arch`` registers in open_clip)."""
    return json.loads(json.dumps(TINY_CFG))
