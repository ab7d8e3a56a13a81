"""Through the real launch path on the tiny recipe: a checkpoint carrying a code-running pickle is refused at
resume and at export in one line (the code never runs); another family, generator mode or teacher is refused
before any model loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmdr.cli import convert_to_diffusers
from dmdr.distributed import RNGState
from dmdr.distributed.checkpoint import read_marker
from dmdr.launch import main
from dmdr.provenance import RECORD_KEY
from tests.tiny_helpers import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class SideEffect:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _argv(assets: dict[str, str], out: Path, **overrides: str) -> list[str]:
    argv = ["--model.path", assets["model"], "--data.sources", assets["prompts"], "--train.output_dir", str(out),
            "--log.progress_bar", "false", "--log.tensorboard", "false", "--dmd.ratio", "1", "--train.max_steps",
            "1", "--checkpoint.interval", "1", "--log.interval", "1", "--log.sample_interval", "0"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('__', '.')}", str(value)]
    return argv


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def forged_run(tiny_assets, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run whose checkpoint's per-rank RNG blob unpickles into ``open(pwned, "w")``."""
    root = tmp_path_factory.mktemp("forged")
    out, pwned = root / "run", root / "pwned"
    state_dict = RNGState.state_dict
    mp = pytest.MonkeyPatch()
    mp.setattr(RNGState, "state_dict", lambda self: {**state_dict(self), "x": SideEffect(pwned)})
    try:
        assert main(load_recipe("tiny_dmdr").tiny_dmdr, _argv(tiny_assets, out)) == 0
    finally:
        mp.undo()
    assert read_marker(out / "checkpoints" / "step-1")[RECORD_KEY]["generator_mode"] == "lora"
    assert not pwned.exists()
    return out, pwned


def test_forged_checkpoint_is_refused_at_resume_and_export(forged_run, tiny_assets, capsys):
    out, pwned = forged_run
    capsys.readouterr()
    assert main(load_recipe("tiny_dmdr").tiny_dmdr, _argv(tiny_assets, out, train__max_steps=2)) == 2
    line = _error_line(capsys)
    assert "entry 'rng.rank0' is not plain data (it names io.open)" in line, line
    assert convert_to_diffusers.main(["--run", str(out), "--out", str(out.parent / "export")]) == 2
    line = _error_line(capsys)
    assert "entry 'rng.rank0' is not plain data" in line, line
    assert not pwned.exists() and not (out.parent / "export").exists()


@pytest.mark.parametrize("case", ["mode", "teacher", "family"])
def test_checkpoint_of_another_setup_is_refused_before_models_load(forged_run, tiny_assets, tmp_path, capsys,
                                                                   monkeypatch, case):
    from dmdr.models.tiny import build_tiny_sd3, build_tiny_zimage

    out, pwned = forged_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    overrides = {
        "mode": {"model__generator_mode": "full"},
        "teacher": {"model__path": str(build_tiny_sd3(tmp_path / "other-sd3", seed=1))},
        "family": {"model__path": str(build_tiny_zimage(tmp_path / "zimage")), "model__family": "auto",
                   "model__max_sequence_length": 48},
    }[case]
    needle = {"mode": "trained with model.generator_mode=lora, the current config has model.generator_mode=full",
              "teacher": f"trained from another teacher: {tiny_assets['model']}",
              "family": "trained with model.family=sd3, the current config has model.family=zimage"}[case]
    monkeypatch.setattr("dmdr.build.build_models", lambda *a, **k: pytest.fail("models built before refusing"))
    capsys.readouterr()
    assert main(load_recipe("tiny_dmdr").tiny_dmdr, _argv(tiny_assets, run, train__max_steps=2, **overrides)) == 2
    line = _error_line(capsys)
    assert needle in line and "another --train.output_dir" in line, line
    assert not pwned.exists()
