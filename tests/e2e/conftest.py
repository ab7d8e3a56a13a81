"""Fixtures of the end-to-end runs: the tiny export runs (the tiny assets are tests/tiny_models.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_helpers import script, tiny_config, tool


@pytest.fixture(scope="session")
def runs(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """Tiny runs, trained a few generator steps: SD3 LoRA and full fine-tune, Z-Image LoRA.

    Session-scoped: the export tests of several modules (test_export.py, test_release.py) share them.
    """
    from dmdr.launch import run
    from dmdr.models.tiny import build_tiny_zimage

    root = tmp_path_factory.mktemp("export-runs")
    quick = {"train__max_steps": 3, "dmd__ratio": 1, "checkpoint__interval": 2}
    specs = {
        "lora": {**quick, "model__generator_mode": "lora"},
        "full": {**quick, "model__generator_mode": "full"},
        # Z-Image: the chat template makes prompts long (byte tokens); 48 cuts them, alike in dmdr and diffusers
        "zimage": {"model__path": str(build_tiny_zimage(root / "tiny-zimage")), "model__family": "auto",
                   "model__max_sequence_length": 48, "data__batch_size": 2, "train__max_steps": 1,
                   "dmd__ratio": 1, "checkpoint__interval": 0},
    }
    out = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before a module's one_thread fixture
    try:
        for name, overrides in specs.items():
            assert run(tiny_config(tiny_assets, root / name, **overrides)) == 0
            out[name] = root / name
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture(scope="session")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run exported as a merged pipeline; the LoRA one by the script itself (as a user runs it)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, run_dir in runs.items():
        out[name] = root / name
        argv = ["--run", str(run_dir), "--out", str(out[name])]
        if name == "lora":
            proc = script("convert_to_diffusers", argv, root)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert tool("convert_to_diffusers").main(argv) == 0
    return out
