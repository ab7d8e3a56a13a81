"""The generator EMA (``optim.ema_decay``): update formula, skipped steps, exact resume, export and sampling.

Tiny SD3 runs on CPU, trained a few generator steps (``dmd.ratio 1``, no RL): a LoRA run with EMA straight
through, the same run in two halves (resumed), a full fine-tune with EMA, and a LoRA run without EMA.
Every generator step of the EMA runs is recorded (the parameters and the EMA before and after), and one
step (``k = 2``) has a non-finite loss, so it is skipped.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dmdr import export
from dmdr.distributed.offline import flatten, read_checkpoint
from dmdr.errors import CheckpointError
from tests.tiny_helpers import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DECAY = 0.9
STEPS = 4
POISONED = {2}
"""Generator steps ``k`` whose DMD loss is made NaN: the step is skipped (no optimizer step, no EMA update)."""
QUICK = {"dmd__ratio": 1, "rl__start_step": 100, "train__max_steps": STEPS, "checkpoint__interval": 2}
WEIGHTS = "diffusion_pytorch_model.safetensors"
PROMPTS = ["a photo of a cat", "a red car in the rain"]


def _tool(name: str):
    return importlib.import_module(f"dmdr.cli.{name}")


def _one_error_line(err: str, needle: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    assert "Traceback" not in err
    return errors[0]


def _train(cfg, records: list[dict] | None = None) -> None:
    """``dmdr.launch.run`` with generator steps ``POISONED`` made non-finite and, if ``records``, every generator
    step recorded: ``k``, whether it was finite, the trainable parameters and the EMA before and after it."""
    import dmdr.engine as engine_mod
    from dmdr.launch import run

    real_loss, real_update = engine_mod.dmd_generator_loss, engine_mod.StepEngine.generator_update
    current = {"k": -1}

    def poisoned_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        if current["k"] in POISONED:
            terms.loss = terms.loss * float("nan")
        return terms

    def snapshot(engine) -> dict[str, list[torch.Tensor]]:
        return {"params": [p.detach().clone() for p in engine.roles.generator_params],
                "ema": [e.detach().clone() for e in (engine.ema.values if engine.ema else [])]}

    def recorded_update(self, *args, **kwargs):
        current["k"] = self.step
        before, skipped = snapshot(self), self.counters.skipped_steps
        metrics = real_update(self, *args, **kwargs)
        if records is not None:
            records.append({"k": self.step, "finite": self.counters.skipped_steps == skipped, "before": before,
                            "after": snapshot(self), "names": self.roles.generator_param_names()})
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "dmd_generator_loss", poisoned_loss)
        mp.setattr(engine_mod.StepEngine, "generator_update", recorded_update)
        assert run(cfg) == 0


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ema-runs")
    out = {name: root / name for name in ("straight", "split", "full", "plain")}
    ema = {**QUICK, "optim__ema_decay": DECAY}
    out["records"] = []
    _train(tiny_config(tiny_assets, out["straight"], **ema), out["records"])
    _train(tiny_config(tiny_assets, out["split"], **{**ema, "train__max_steps": STEPS // 2}))
    _train(tiny_config(tiny_assets, out["split"], **ema))  # same output_dir: resumes from step-2
    _train(tiny_config(tiny_assets, out["full"], **{**ema, "model__generator_mode": "full", "train__max_steps": 2,
                                                    "checkpoint__interval": 0}))
    _train(tiny_config(tiny_assets, out["plain"], **{**QUICK, "train__max_steps": 1, "checkpoint__interval": 0}))
    return out


def _saved_ema(path: Path) -> dict[str, torch.Tensor]:
    flat = flatten(read_checkpoint(path))
    return {k[len(export.EMA_PREFIX):]: v for k, v in flat.items() if k.startswith(export.EMA_PREFIX)}


def test_ema_follows_the_float64_recurrence_and_skips_non_finite_steps(runs):
    records = runs["records"]
    assert [r["k"] for r in records] == list(range(STEPS))
    assert [r["finite"] for r in records] == [k not in POISONED for k in range(STEPS)]
    first = records[0]["before"]
    # the EMA starts as a copy of the initial trainable parameters
    assert all(torch.equal(e, p) for e, p in zip(first["ema"], first["params"]))
    ema = [p.double() for p in first["params"]]
    naive = list(ema)  # a wrong EMA that also moves on skipped steps
    for r in records:
        after = [p.double() for p in r["after"]["params"]]
        if not r["finite"]:  # a skipped step leaves the parameters alone...
            assert all(torch.equal(a, b) for a, b in zip(r["after"]["params"], r["before"]["params"]))
        else:
            ema = [DECAY * e + (1 - DECAY) * p for e, p in zip(ema, after)]
        naive = [DECAY * e + (1 - DECAY) * p for e, p in zip(naive, after)]
        for got, want in zip(r["after"]["ema"], ema):  # ...and the EMA (an fp32 lerp, a few ulps per step)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
    final, params = records[-1]["after"]["ema"], records[-1]["after"]["params"]
    assert max((a.double() - b).abs().max().item() for a, b in zip(final, naive)) > 1e-7  # skipping is visible
    assert max((a - b).abs().max().item() for a, b in zip(final, params)) > 1e-6  # the EMA is not the weights
    # the checkpoint holds the EMA under the generator's parameter names
    saved = _saved_ema(runs["straight"] / "checkpoints" / f"step-{STEPS}")
    names = records[-1]["names"]
    assert sorted(saved) == sorted(names) and any(n.endswith("lora_B.generator") for n in names)
    assert all(torch.equal(saved[n], e) for n, e in zip(names, final))


def test_resume_keeps_the_ema_bit_for_bit(runs):
    for step in (STEPS // 2, STEPS):
        a = flatten(read_checkpoint(runs["straight"] / "checkpoints" / f"step-{step}"))
        b = flatten(read_checkpoint(runs["split"] / "checkpoints" / f"step-{step}"))
        ema_keys = [k for k in a if k.startswith(export.EMA_PREFIX)]
        model_keys = [k for k in a if k.startswith("models.model.") and k.endswith(".generator")]
        assert ema_keys and model_keys and sorted(ema_keys) == sorted(k for k in b if k.startswith(export.EMA_PREFIX))
        for k in ema_keys + model_keys:
            assert torch.equal(a[k], b[k]), (step, k)
    # the resumed half started from the saved EMA, not from a fresh copy of the resumed weights
    at_half = _saved_ema(runs["split"] / "checkpoints" / f"step-{STEPS // 2}")
    weights = flatten(read_checkpoint(runs["split"] / "checkpoints" / f"step-{STEPS // 2}"))
    assert any(not torch.equal(v, weights[f"models.model.{k}"]) for k, v in at_half.items())


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ema-exports")
    convert = _tool("convert_to_diffusers")
    out = {}
    for name, run_dir, weights in [("ema", "straight", "ema"), ("trained", "straight", "trained"),
                                   ("auto", "straight", "auto"), ("plain-auto", "plain", "auto"),
                                   ("full-ema", "full", "ema")]:
        out[name] = root / name
        assert convert.main(["--run", str(runs[run_dir]), "--out", str(out[name]), "--weights", weights]) == 0
    return out


def _merged(teacher: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``W + alpha/r * B A`` in float64 for every layer with a generator LoRA (``lora`` keyed ``net.<layer>...``)."""
    out = {}
    for key, a in lora.items():
        if key.endswith(".lora_A.generator"):
            layer = key[len("net."):-len(".lora_A.generator")]
            b = lora[f"net.{layer}.lora_B.generator"]
            out[f"{layer}.weight"] = teacher[f"{layer}.weight"].double() + scale * (b.double() @ a.double())
    return out


def _source(folder: Path) -> dict:
    return json.loads((folder / export.SETTINGS_FILE).read_text())["source"]


def test_export_ema_is_the_merged_ema_lora_and_auto_picks_it(tiny_assets, runs, exports):
    cfg = export.read_run_config(runs["straight"])
    scale = cfg.model.generator_lora_alpha / cfg.model.generator_lora_rank
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / WEIGHTS)
    checkpoint = export.resolve_checkpoint(runs["straight"])
    ema = _saved_ema(checkpoint)
    trained = {k[len("models.model."):]: v for k, v in flatten(read_checkpoint(checkpoint)).items()
               if k.startswith("models.model.") and k.endswith(".generator")}
    got = {name: load_file(exports[name] / "transformer" / WEIGHTS) for name in ("ema", "trained", "auto")}
    for name, lora in (("ema", ema), ("trained", trained)):
        expected = _merged(teacher, lora, scale)
        assert len(expected) > 0
        for k, v in expected.items():
            torch.testing.assert_close(got[name][k].double(), v, atol=1e-6, rtol=0)
        untouched = [k for k in teacher if k not in expected]
        assert all(torch.equal(got[name][k], teacher[k]) for k in untouched)
    assert max((got["ema"][k] - got["trained"][k]).abs().max().item() for k in teacher) > 1e-5
    assert got["auto"].keys() == got["ema"].keys()
    assert all(torch.equal(got["auto"][k], got["ema"][k]) for k in got["ema"])
    assert _source(exports["ema"])["weights"] == "ema" and _source(exports["ema"])["ema_decay"] == DECAY
    assert _source(exports["auto"])["weights"] == "ema"
    assert _source(exports["trained"])["weights"] == "trained" and "ema_decay" not in _source(exports["trained"])
    assert f"EMA weights, optim.ema_decay = {DECAY}" in (exports["ema"] / "README.md").read_text()
    assert "trained weights, not an EMA" in (exports["trained"] / "README.md").read_text()


def test_export_auto_without_ema_is_the_trained_weights(tiny_assets, runs, exports):
    cfg = export.read_run_config(runs["plain"])
    assert cfg.optim.ema_decay == 0 and export.checkpoint_ema_names(export.resolve_checkpoint(runs["plain"])) == []
    assert _source(exports["plain-auto"])["weights"] == "trained"
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / WEIGHTS)
    trained = {k[len("models.model."):]: v
               for k, v in flatten(read_checkpoint(export.resolve_checkpoint(runs["plain"]))).items()
               if k.startswith("models.model.") and k.endswith(".generator")}
    got = load_file(exports["plain-auto"] / "transformer" / WEIGHTS)
    scale = cfg.model.generator_lora_alpha / cfg.model.generator_lora_rank
    for k, v in _merged(teacher, trained, scale).items():
        torch.testing.assert_close(got[k].double(), v, atol=1e-6, rtol=0)


def test_full_mode_export_ema_is_the_saved_ema(runs, exports):
    ema = _saved_ema(export.resolve_checkpoint(runs["full"]))
    weights = flatten(read_checkpoint(export.resolve_checkpoint(runs["full"])))
    got = load_file(exports["full-ema"] / "transformer" / WEIGHTS)
    averaged = [k for k in got if f"net.{k}" in ema]
    assert len(ema) > 0 and len(averaged) == len(ema)  # every parameter of the full copy has an EMA...
    assert all(torch.equal(got[k], ema[f"net.{k}"]) for k in averaged)
    for k in set(got) - set(averaged):  # ...and the rest are buffers (pos_embed), exported as saved
        assert torch.equal(got[k], weights[f"generator.model.net.{k}"]), k
    assert any(not torch.equal(got[k], weights[f"generator.model.net.{k}"]) for k in averaged)
    assert _source(exports["full-ema"])["weights"] == "ema"


def test_ema_on_a_run_without_ema_is_one_line(runs, tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["--run", str(runs["plain"]), "--weights", "ema"]
    assert _tool("convert_to_diffusers").main([*argv, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "optim.ema_decay = 0")
    assert str(runs["plain"] / "checkpoints" / "step-1") in line
    assert not out.exists()
    assert _tool("sample").main([*argv, "--prompts", "a cat", "--out", str(tmp_path / "grid.png")]) == 2
    _one_error_line(capsys.readouterr().err, "optim.ema_decay = 0")
    assert not (tmp_path / "grid.png").exists()


def test_ema_under_other_names_is_one_clear_error(runs, monkeypatch):
    """An EMA saved under names this generator does not have (e.g. by an older dmdr, which keyed it by index)."""
    from dmdr.trainer import Roles

    real = Roles.generator_param_names
    monkeypatch.setattr(Roles, "generator_param_names", lambda self: [f"{i}" for i, _ in enumerate(real(self))])
    cfg = export.read_run_config(runs["straight"])
    with pytest.raises(CheckpointError, match=r"does not match this generator: no EMA of '0' \(\d+ of \d+ param"):
        export.load_generator(cfg, export.resolve_checkpoint(runs["straight"]), weights="auto")


def test_sample_tool_weights(runs, exports, tmp_path):
    sample = _tool("sample")

    def images(*argv: str) -> list[np.ndarray]:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}" / "grid.png"
        assert sample.main([*argv, "--prompts", *PROMPTS, "--out", str(out), "--seed", "5"]) == 0
        return [np.asarray(Image.open(out.with_name(f"grid-{i:03d}.png")), dtype=np.int32) for i in range(2)]

    run = ["--run", str(runs["straight"])]
    ema, auto, trained = images(*run, "--weights", "ema"), images(*run), images(*run, "--weights", "trained")
    exported = images("--pipeline", str(exports["ema"]))
    for i in range(2):
        assert np.array_equal(ema[i], auto[i])  # auto picks the EMA
        assert np.abs(ema[i] - exported[i]).max() <= 1  # the EMA export samples like the checkpoint's EMA
    assert max(np.abs(e - t).max() for e, t in zip(ema, trained)) > 0


def test_resume_turning_ema_on_starts_it_from_the_resumed_weights(tiny_assets, runs, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["plain"], run_dir)  # 1 generator step, written without EMA
    cfg = tiny_config(tiny_assets, run_dir, **{**QUICK, "train__max_steps": 2, "checkpoint__interval": 0,
                                               "optim__ema_decay": DECAY})
    records: list[dict] = []
    with caplog.at_level("WARNING", logger="dmdr.trainer"):
        _train(cfg, records)
    assert any("holds no EMA" in r.getMessage() for r in caplog.records)
    (step,) = records
    assert step["k"] == 1 and step["finite"]
    # the EMA starts as the resumed weights, then follows the recurrence
    assert all(torch.equal(e, p) for e, p in zip(step["before"]["ema"], step["before"]["params"]))
    for e, before, after in zip(step["after"]["ema"], step["before"]["params"], step["after"]["params"]):
        torch.testing.assert_close(e.double(), DECAY * before.double() + (1 - DECAY) * after.double(),
                                   rtol=1e-6, atol=1e-7)
    assert export.checkpoint_ema_names(export.resolve_checkpoint(run_dir, 2))


def test_lora_release_holds_the_ema_adapter(runs, tmp_path):
    from dmdr.export.release import LORA_FILE

    out = tmp_path / "lora-ema"
    assert _tool("convert_to_diffusers").main(["--run", str(runs["straight"]), "--out", str(out), "--lora"]) == 0
    cfg = export.read_run_config(runs["straight"])
    scale = cfg.model.generator_lora_alpha / cfg.model.generator_lora_rank
    ema = _saved_ema(export.resolve_checkpoint(runs["straight"]))
    saved = load_file(out / LORA_FILE)
    layers = [k[len("net."):-len(".lora_A.generator")] for k in ema if k.endswith(".lora_A.generator")]
    assert len(saved) == 2 * len(layers) > 0
    for layer in layers:
        assert torch.equal(saved[f"transformer.{layer}.lora_A.weight"], ema[f"net.{layer}.lora_A.generator"])
        torch.testing.assert_close(saved[f"transformer.{layer}.lora_B.weight"],
                                   scale * ema[f"net.{layer}.lora_B.generator"], atol=1e-7, rtol=1e-6)
    assert _source(out)["weights"] == "ema" and _source(out)["form"] == "lora"
