"""``benchmarks/paper_tables.py``: the job plan, the tables and orderings on made-up results, and the quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmdr.worlds.shapes import tables
from dmdr.worlds.shapes.ablations import INIT, TABLE4, TABLE5, Settings, expected_wall, plan_jobs
from dmdr.worlds.shapes.report import KEYS

REPO = Path(__file__).resolve().parents[2]


def _settings(**kw) -> Settings:
    base = {"out": "/tmp/nowhere", "teacher": str(REPO / "assets" / "shapes-teacher"), "seeds": 2, "cold_steps": 6,
            "rl_steps": 4, "curve_every": 2, "prompts": 8, "noise_seeds": 1}
    return Settings(**{**base, **kw})


def _flag(argv: list[str], name: str) -> list[str]:
    """Every value given to ``name`` in ``argv`` (the last one wins in the recipe's parser)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_plan_has_every_row_for_every_seed_and_table5_waits_for_its_init():
    s = _settings()
    jobs = {j.name: j for j in plan_jobs(s)}
    assert len(jobs) == 1 + s.seeds * (len(TABLE4) + len(TABLE5))
    for seed in range(s.seeds):
        for arm in TABLE4:
            job = jobs[f"t4/{arm.key}/seed{seed}"]
            assert job.score_steps == [3, 6] and _flag(job.argv, "--train.max_steps") == ["6"]
            assert _flag(job.argv, "--train.seed") == [str(seed)] and not job.after
        for arm in TABLE5:
            job = jobs[f"t5/{arm.key}/seed{seed}"]
            assert job.after == f"t4/{INIT}/seed{seed}"
            assert job.start.endswith(f"t4/{INIT}/seed{seed}/checkpoints/step-6")
            assert job.score_steps == [8, 10] and _flag(job.argv, "--train.max_steps") == ["10"]
    # the arms are what the paper's rows say
    static = jobs["t4/static/seed0"].argv
    assert _flag(static, "--dynamic.schedule") == ["constant"]
    assert _flag(jobs["t4/vanilla/seed0"].argv, "--dynamic.dynadg") == ["false"]
    assert _flag(jobs["t4/dynadg/seed0"].argv, "--dynamic.dynars") == ["false"]
    only = jobs["t5/dpo_only/seed1"].argv
    assert _flag(only, "--dmd.weight") == ["0"] and _flag(only, "--rl.method") == ["dpo"]
    assert _flag(jobs["t5/grpo_only/seed0"].argv, "--rl.grpo_kl_weight") == ["0.04"]  # Flow-GRPO's KL, alone
    assert _flag(jobs["t5/grpo/seed0"].argv, "--rl.grpo_kl_weight") == []  # with DMD: DMD replaces the KL
    assert _flag(jobs["t5/grpo/seed0"].argv, "--dmd.weight") == [] and _flag(jobs["t5/distill/seed0"].argv,
                                                                             "--rl.method") == ["none"]
    # user overrides come last, so they win over an arm's
    user = plan_jobs(_settings(overrides=("--dmd.ratio", "3")))
    assert all(j.argv[-2:] == ["--dmd.ratio", "3"] for j in user if j.name != "reference")


def test_table5_alone_trains_only_the_init_cold_starts():
    names = [j.name for j in plan_jobs(_settings(tables=(5,), seeds=1))]
    assert [n for n in names if n.startswith("t4/")] == [f"t4/{INIT}/seed0"]


def test_expected_wall_respects_cores_and_dependencies():
    jobs = plan_jobs(_settings(seeds=1))
    serial = sum(j.cost for j in jobs)
    assert expected_wall(jobs, 1) == pytest.approx(serial)
    two = expected_wall(jobs, 2)
    assert serial / 2 <= two < serial
    init = next(j for j in jobs if j.name == f"t4/{INIT}/seed0")
    branch = next(j for j in jobs if j.name.startswith("t5/"))
    assert expected_wall(jobs, 100) >= init.cost + branch.cost - 1e-9  # a branch never starts before its init


def test_spec_hash_changes_with_what_a_run_trains():
    a, b = plan_jobs(_settings())[1], plan_jobs(_settings(cold_steps=8))[1]
    assert a.name == b.name and a.spec_hash() != b.spec_hash()
    assert a.spec_hash() == plan_jobs(_settings(curve_every=3))[1].spec_hash()  # Table 4 has no curve


# ------------------------------------------------------------------------------------------------ tables
def _scores(overall: float, fidelity: float = 0.95, reward: float = 0.5) -> dict[str, float]:
    return {**{k: 0.1 for k in KEYS}, "overall": overall, "fidelity": fidelity, "reward": reward}


def _fake_results(s: Settings, overall: dict[str, list[float]], fidelity: dict[str, list[float]] | None = None):
    """Results as the jobs write them; ``overall[key]`` per seed (the same at every scored step)."""
    fidelity = fidelity or {}
    results = {"reference": {"rows": [{"label": "teacher", "nfe": 50, "scores": _scores(0.3)}]}}
    for job in plan_jobs(s):
        if job.name == "reference":
            continue
        table, key, seed = job.name.split("/")
        seed = int(seed[4:])
        curve = [{"step": k, "reward/shapes": 0.5, "schedule/lora_scale_real": 0.5} for k in (1, job.score_steps[-1])]
        results[job.name] = {
            "name": job.name, "scores": {str(k): _scores(overall[key][seed], fidelity.get(key, [0.95] * 9)[seed])
                                         for k in job.score_steps},
            "curve": curve, "train_s": 10.0, "score_s": 1.0, "config": {"seed": seed}}
    return results


def test_orderings_are_computed_from_the_numbers_with_their_seed_spread():
    s = _settings()
    overall = {"vanilla": [0.10, 0.12], "dynadg": [0.20, 0.22], "dynars": [0.21, 0.23], "static": [0.30, 0.10],
               "distill": [0.25, 0.25], "refl_only": [0.30, 0.30], "refl": [0.40, 0.42], "dpo_only": [0.2, 0.2],
               "dpo": [0.26, 0.26], "grpo_only": [0.2, 0.2], "grpo": [0.24, 0.25]}
    fid = {"refl_only": [0.80, 0.81], "refl": [0.95, 0.95]}
    results = _fake_results(s, overall, fid)
    claims = {c["claim"]: c for c in tables.claims4(tables.table4(results, s), s) + tables.claims5(
        tables.table5(results, s))}
    c = claims["+DynaDG beats vanilla DMD on ShapeEval at 6 steps"]
    assert c["holds"] and c["clear"] and c["paper_holds"]
    c = claims["+DynaRS beats -Dynamic on ShapeEval at 6 steps"]  # 0.22 vs 0.20 with a 0.14 spread
    assert c["holds"] and c["clear"] is False
    assert claims["Distill. + RL (DPO) beats only RL (DPO) on ShapeEval"]["holds"]
    c = claims["Distill. + RL (ReFL) keeps a higher fidelity than only RL (ReFL)"]
    assert c["holds"] and c["clear"] and c["numbers"].startswith("0.950")
    assert claims["ReFL is the best RL branch with distillation (ShapeEval)"]["holds"]
    assert claims["only Distill. moves ShapeEval up from the init"]["holds"]  # 0.25 vs the init's 0.22
    # a tie is not a win
    overall["refl"], overall["grpo"] = [0.3, 0.3], [0.3, 0.3]
    tied = tables.claims5(tables.table5(_fake_results(s, overall), s))
    assert not next(c for c in tied if c["claim"].startswith("ReFL is the best"))["holds"]


def test_rows_carry_mean_std_per_seed_config_and_wall_time():
    s = _settings()
    overall = {k: [0.1, 0.3] for k in [a.key for a in TABLE4] + [a.key for a in TABLE5]}
    results = _fake_results(s, overall)
    rows5 = tables.table5(results, s)
    assert [r["label"] for r in rows5] == ["init", *[a.label for a in TABLE5]]
    row = rows5[1]
    assert row["scores"]["overall"]["mean"] == pytest.approx(0.2)
    assert row["scores"]["overall"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert len(row["per_seed"]) == 2 and row["wall_s"]["mean"] == 11.0
    assert row["overrides"] == ["--rl.method", "none", "--data.rl_batch_for_distill", "true"]
    md = tables.markdown5(rows5)
    assert "| w/ only Distill. | 0.200 ± 0.141 |" in md and "33.67 / 5.62 / 21.64 / 29.14" in md
    rows4 = tables.table4(results, s)
    assert set(rows4[0]["at"]) == {"3", "6"} and rows4[0]["schedule"]["lora_scale_real"] == [0.5, 0.5]
    assert "ShapeEval @3" in tables.markdown4(rows4, s)
    curve = tables.curves(results, s)
    assert curve["refl"]["rl_step"] == [0, 2, 4] and curve["refl"]["overall"][0]["mean"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.slow
def test_quick_run_writes_both_tables_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "paper_tables.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "expected wall time about" in done.stdout and "[12/12]" in done.stdout
    report = json.loads((out / "paper_tables.json").read_text())
    assert report["commit"] and report["settings"]["seeds"] == 1
    assert [r["key"] for r in report["table4"]] == [a.key for a in TABLE4]
    assert [r["key"] for r in report["table5"]] == ["init", *[a.key for a in TABLE5]]
    for row in report["table5"]:
        assert set(row["scores"]) >= set(KEYS) and row["config"] and row["wall_s"]["mean"] > 0
    # each arm trained as it says (the logged schedules), and the branches started from the init's checkpoint
    schedule = {r["key"]: r["schedule"] for r in report["table4"]}
    assert schedule["static"]["lora_scale_real"] == [0.5, 0.5] and schedule["vanilla"]["lora_scale_real"] == [0, 0]
    assert schedule["dynars"]["lora_scale_real"][1] < 0.5
    for key in ("refl_only", "dpo", "grpo_only"):
        metrics = [json.loads(x) for x in (out / "t5" / key / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["step"] == 3 and "loss/rl" in metrics[-1]
        assert ("loss/dmd" in metrics[-1]) == (not key.endswith("_only"))
    assert "rl/grpo_kl" in metrics[-1]  # only-RL GRPO keeps Flow-GRPO's KL term
    assert len(report["claims"]) == 8 + 11 and all(isinstance(c["holds"], bool) for c in report["claims"])
    text = (out / "paper_tables.md").read_text()
    assert "## Table 4" in text and "## Table 5" in text and "## The paper's orderings" in text
    assert (out / "hacking.png").stat().st_size > 10_000
    # only the last checkpoint of each run is kept
    assert sorted(p.name for p in (out / "t5" / "refl" / "seed0" / "checkpoints").glob("step-*")) == ["step-4"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": cached") == 12, again.stdout[-2000:]
