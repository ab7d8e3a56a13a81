"""Tools that guess right (issue 29): eval on LoRA / single-file releases and in --compare with --steps, the
shapes world's metric, the CLIP flag's error; sample.py on a teacher folder; plan.py's progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_helpers import REPO, tool

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN_RGB = """
from dmdr.evaluation import Metric, register_metric

register_metric(Metric("mean_rgb", load=lambda options, device: lambda images, prompts: images.mean(dim=(1, 2, 3)),
                       check=lambda options: None))
"""


@pytest.fixture
def mean_rgb(tmp_path, monkeypatch) -> list[str]:
    """A plugged-in metric (each image's mean value): scores that equal images give equal numbers."""
    from dmdr.evaluation import registry

    monkeypatch.setattr(registry, "METRICS", dict(registry.METRICS))
    (tmp_path / "dmdr_mean_rgb.py").write_text(MEAN_RGB)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["--plugin", "dmdr_mean_rgb", "--metrics", "mean_rgb"]


def _prompts(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_eval_scores_lora_and_single_file_releases_and_keeps_student_steps(runs, tiny_assets, tmp_path, mean_rgb):
    convert = tool("convert_to_diffusers").main
    exports = {}
    for form, flags in (("pipeline", []), ("lora", ["--lora"]), ("single", ["--single-file"])):
        exports[form] = tmp_path / form
        assert convert(["--run", str(runs["lora"]), "--out", str(exports[form]), *flags]) == 0
    out = tmp_path / "eval"
    argv = ["--compare", *(str(p) for p in exports.values()), tiny_assets["model"], "--steps", "3",
            "--prompts", _prompts(tmp_path, ["a photo of a cat", "a bowl of fruit"]), "--out", str(out),
            "--no-progress", "--batch-size", "2", *mean_rgb]
    assert tool("eval").main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    pipeline, lora, single, base = data["models"]
    assert [m["kind"] for m in data["models"]] == ["export", "release", "release", "base"]
    # --steps 3 reached the teacher (3 CFG steps = 6 passes) and not the 4-step student, in any form
    assert (pipeline["nfe"], lora["nfe"], single["nfe"], base["nfe"]) == (4, 4, 4, 6)
    for release in (lora, single):
        for a, b in zip(release["scores"]["mean_rgb"], pipeline["scores"]["mean_rgb"]):
            assert a == pytest.approx(b, abs=2e-3)
    assert base["scores"]["mean_rgb"] != pipeline["scores"]["mean_rgb"]


def test_a_shapes_world_model_gets_shapeeval_without_asking(tmp_path, caplog):
    import logging

    teacher = REPO / "assets" / "shapes-teacher"
    out = tmp_path / "eval"
    argv = ["--model", str(teacher), "--steps", "2", "--prompts", _prompts(tmp_path, ["a red circle"]),
            "--out", str(out), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="dmdr"):
        assert tool("eval").main(argv) == 0
    assert "shapeeval" in json.loads((out / "results.json").read_text())["metrics"]
    assert any("shapes-world model (world.json)" in r.getMessage() for r in caplog.records)


def test_shapes_world_is_found_through_an_export_or_a_run(tmp_path):
    from dmdr.cli.eval import shapes_world
    from dmdr.export import SETTINGS_FILE

    teacher = REPO / "assets" / "shapes-teacher"
    export = tmp_path / "export"
    export.mkdir()
    (export / SETTINGS_FILE).write_text(json.dumps({"source": {"teacher": str(teacher)}}))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"path": str(teacher)}}))
    other = tmp_path / "other"
    other.mkdir()
    (other / SETTINGS_FILE).write_text(json.dumps({"source": {"teacher": str(tmp_path)}}))
    assert shapes_world(str(teacher)) and shapes_world(str(export)) and shapes_world(str(run))
    assert shapes_world(str(run / "checkpoints" / "step-4")) and not shapes_world(str(other))


def test_a_bad_clip_model_folder_is_named_as_a_clip_folder(tiny_assets, tmp_path, capsys):
    bad = tmp_path / "not-clip"
    bad.mkdir()
    (bad / "weights.bin").write_bytes(b"x")
    argv = ["--model", tiny_assets["model"], "--prompts", _prompts(tmp_path, ["a cat"]), "--out", str(tmp_path / "o"),
            "--clip-model", str(bad), "--metrics", "clip"]
    assert tool("eval").main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--clip-model" in err[0] and "PickScore" not in err[0]
    assert "an open_clip folder or a transformers CLIPModel folder" in err[0]


def test_sample_on_a_teacher_folder_says_what_to_use(tiny_assets, tmp_path, capsys):
    for flag in ("--pipeline", "--run"):
        argv = [flag, tiny_assets["model"], "--prompts", "a cat", "--out", str(tmp_path / "grid.png")]
        assert tool("sample").main(argv) == 2
        err = capsys.readouterr().err
        assert "is a base diffusers pipeline (a teacher" in err and f"tools/eval.py --model {tiny_assets['model']}" \
            in err, err


@pytest.mark.slow
def test_plan_prints_its_progress(capsys):
    assert tool("plan").main(["--recipe", "sd3m_dmdr", "--json", "-"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("plan: [") and "meta device" in err[0] and err[-1].endswith("done")
    assert any("largest batch with activation checkpointing full" in line for line in err)
