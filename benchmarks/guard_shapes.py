"""Does the guard catch reward hacking before it costs fidelity, without false alarms? On the shapes world.

    python benchmarks/guard_shapes.py --out runs/guard-bench [--seeds 0 1 2] [--cold-start 60 --rl-steps 60]
    python benchmarks/guard_shapes.py --out /tmp/smoke --tiny          # the code path at smoke size (minutes)

Stages (one training process at a time, ``--threads`` threads each):

1. per seed, the shapes recipe's cold start (DMD with DynaDG + DynaRS, guard off) with ``--train.seed``: a run
   resumed from a checkpoint restores its RNG states and data order, so branches of one shared cold start
   train the same run whatever their ``--train.seed`` (``--coldstart DIR`` reuses one, for one seed only);
2. per seed, from that cold start's last checkpoint, with ``--guard.action warn`` and a checkpoint at every
   probe: **ReFL only** (``--dmd.weight 0``,
   the arm that hacks the colour reward), **DMDR** and **DMD only** (``--rl.method none``);
3. per seed, **ReFL only** again with ``--guard.action rollback``;
4. every checkpoint of 2 and the end of 3 scored with ShapeEval's fidelity (which the guard never sees: its
   rules use only the real-model signals of :mod:`dmdr.guard.probe`); ``--no-fidelity`` skips it.

The warn runs' logged probes are judged again by the current rules (defaults plus any ``--guard.*`` override),
so a change of thresholds needs no retraining. Prints and writes ``<out>/guard_bench.json``: per seed, the
detection step on ReFL only vs the probe from which its fidelity stays below DMDR's, the false alarms (probes that
tripped) of DMDR and DMD only, and the rollback run's fidelity vs the unguarded ReFL run's at the same step and
at the end; then the same over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "shapes_dmdr.py"
GUARD_STOP_EXIT = 4  # dmdr.launch: the guard stopped the run (a trip after the last allowed rollback)
ARMS = {"refl": ["--dmd.weight", "0", "--guard.action", "warn"],
        "dmdr": ["--guard.action", "warn"],
        "dmd": ["--rl.method", "none", "--data.rl_batch_for_distill", "true", "--guard.action", "warn"],
        "refl_rollback": ["--dmd.weight", "0", "--guard.action", "rollback"]}
"""Each arm's flags on top of the branch's (the demo's arms: ``dmdr.cli.demo``)."""
TINY = ["--data.batch_size", "4", "--data.rl_batch_size", "4", "--dmd.ratio", "2", "--checkpoint.keep_last", "1000"]
"""``--tiny``: the smoke size's batch and critic ratio (the code path, not the measurement)."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/guard-bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of the branch runs")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--cold-start", type=int, default=60)
    p.add_argument("--coldstart", default="", help="an existing cold-start run folder (its step --cold-start); "
                   "one seed only")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--interval", type=int, default=10, help="guard.interval (and the scored checkpoints)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts in each fidelity score")
    p.add_argument("--no-fidelity", action="store_true", help="skip ShapeEval (the trips need none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rollbacks", type=int, default=3, help="guard.max_rollbacks of the rollback run")
    p.add_argument("--tiny", action="store_true", help="smoke size: cold start 4, 8 RL steps, probes every 4, "
                   "batch 4, critic ratio 2, 4 fidelity prompts")
    p.add_argument("overrides", nargs="*", help="after --: extra --section.field value overrides for every run")
    args = p.parse_args(argv)
    if args.coldstart and len(args.seeds) > 1:
        p.error("--coldstart takes one --seeds value: branches resumed from one checkpoint restore its RNG states "
                "and data order, so every seed would train the same run")
    if args.tiny:
        args.cold_start, args.rl_steps, args.interval, args.prompts = 4, 8, 4, 4
        args.overrides = [*TINY, *args.overrides]
    return args


def train(run_dir: Path, argv: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        done = subprocess.run([sys.executable, str(RECIPE), "--train.output_dir", str(run_dir), "--log.progress_bar",
                               "false", "--log.tensorboard", "false", *argv], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode not in (0, GUARD_STOP_EXIT):
        raise SystemExit(f"error: {run_dir.name} failed (exit {done.returncode}); see {run_dir}.log")
    return time.time() - t0


def probes(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("probe/", "guard/", "train/"))}
            for r in rows if "guard/trips" in r}


def _latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "guard.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def offline_trips(rows: dict[int, dict[str, float]], overrides: list[str]) -> dict[int, list[str]]:
    """The rules (today's defaults plus ``--guard.*`` ``overrides``) re-applied to a warn run's logged probes."""
    from dmdr.config import TrainConfig, apply_overrides
    from dmdr.guard.rules import evaluate

    g = apply_overrides(TrainConfig(), overrides).guard
    steps = sorted(rows)
    out, history = {}, []
    for step in steps:
        history = [*history, rows[step]][-(g.trend_window + 1):]
        if step != steps[0]:
            out[step] = sorted({t.rule for t in evaluate(rows[step], rows[steps[0]], history, g)})
    return out


def fidelity(run_dir: Path, steps: list[int], prompts: int) -> dict[int, float]:
    """ShapeEval's fidelity of the checkpoints at ``steps``, kept in ``<run_dir>/fidelity-<prompts>.json`` (a
    rerun re-judges without rescoring)."""
    from dmdr.worlds.shapes.ablations import score_checkpoint

    cache = run_dir / f"fidelity-{prompts}.json"
    known = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    out = {}
    for step in steps:
        if step not in known and (run_dir / "checkpoints" / f"step-{step}").is_dir():
            known[step] = score_checkpoint(run_dir, step, prompts)["fidelity"]
            cache.write_text(json.dumps(known, sort_keys=True) + "\n")
        if step in known:
            out[step] = known[step]
    return out


def _guard_flags(overrides: list[str]) -> list[str]:
    return [a for i, a in enumerate(overrides) if a.startswith("--guard.")
            or (i and overrides[i - 1].startswith("--guard."))]


def seed_summary(arms: dict[str, dict], end: int) -> dict:
    """One seed's numbers: detection vs fidelity on ReFL only, false alarms, the rollback run vs unguarded."""
    out: dict = {}
    refl, dmdr = arms.get("refl"), arms.get("dmdr")
    if refl is not None:
        out["refl_detection_step"] = min(refl["trips_now"], default=None)
        out["refl_trips"] = refl["trips_now"]
    if refl is not None and dmdr is not None and refl["fidelity"] and dmdr["fidelity"]:
        # from which probe on ReFL only stays below DMDR (the baseline probe, one step in, differs by noise only)
        steps = [s for s in sorted(refl["fidelity"])[1:] if s in dmdr["fidelity"]]
        under = [refl["fidelity"][s] < dmdr["fidelity"][s] for s in steps]
        below = next((s for i, s in enumerate(steps) if all(under[i:])), None)
        detect = out["refl_detection_step"]
        out["refl_first_step_below_dmdr_fidelity"] = below
        out["detected_before_fidelity_fell"] = detect is not None and (below is None or detect <= below)
    for name in ("dmdr", "dmd"):
        if name in arms:
            out[f"{name}_false_alarms"] = len(arms[name]["trips_now"])
            out[f"{name}_trips"] = arms[name]["trips_now"]
    rolled = arms.get("refl_rollback")
    if rolled is not None:
        last = max(rolled["probes"], default=None)
        out["rollback"] = {"final_step": last, "actions": [(e["step"], e["action"]) for e in rolled["events"]],
                           "fidelity": rolled["fidelity"].get(last)}
        if refl is not None:
            out["rollback"]["unguarded_fidelity_same_step"] = refl["fidelity"].get(last)
            out["rollback"]["unguarded_fidelity_end"] = refl["fidelity"].get(end)
    return out


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """The per-seed numbers side by side, and how many seeds detected / false-alarmed."""
    rows = list(per_seed.values())

    def column(key: str) -> list:
        return [r.get(key) for r in rows]

    out = {"seeds": list(per_seed), "refl_detection_step": column("refl_detection_step"),
           "refl_first_step_below_dmdr_fidelity": column("refl_first_step_below_dmdr_fidelity"),
           "detected": sum(d is not None for d in column("refl_detection_step")),
           "dmdr_false_alarms": column("dmdr_false_alarms"), "dmd_false_alarms": column("dmd_false_alarms")}
    rolled = [r["rollback"] for r in rows if "rollback" in r]
    if rolled:
        out["rollback_fidelity"] = [r["fidelity"] for r in rolled]
        out["unguarded_fidelity_same_step"] = [r.get("unguarded_fidelity_same_step") for r in rolled]
        out["unguarded_fidelity_end"] = [r.get("unguarded_fidelity_end") for r in rolled]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cold, end = args.cold_start, args.cold_start + args.rl_steps
    common = ["--dynamic.decay_steps", str(cold), "--rl.start_step", str(cold), "--log.sample_interval", "0",
              *args.overrides]
    walls: dict[str, float] = {}
    branch = [*common, "--train.max_steps", str(end), "--guard.interval", str(args.interval),
              "--checkpoint.interval", str(args.interval), "--checkpoint.keep_last", "1000",
              "--guard.max_rollbacks", str(args.max_rollbacks)]
    guard_flags = _guard_flags(args.overrides)
    report: dict = {"args": vars(args), "seeds": {}}
    for seed in args.seeds:
        cold_dir = Path(args.coldstart) if args.coldstart else out / f"seed-{seed}" / "coldstart"
        if not (cold_dir / "checkpoints" / f"step-{cold}").is_dir():
            walls[f"seed-{seed}/coldstart"] = train(cold_dir, [*common, "--train.seed", str(seed), "--guard.action",
                                                               "off", "--train.max_steps", str(cold),
                                                               "--checkpoint.interval", str(cold)], args.threads)
        start = ["--checkpoint.resume", str(cold_dir / "checkpoints" / f"step-{cold}")]
        arms: dict[str, dict] = {}
        for name in args.arms:
            run_dir = out / f"seed-{seed}" / name
            finished = (run_dir / "checkpoints" / "latest").exists() and (_latest(run_dir) >= end or any(
                e["action"] == "stop" for e in events(run_dir)))
            if not finished:
                argv = [*branch, *start, "--train.seed", str(seed), *ARMS[name]]
                walls[f"seed-{seed}/{name}"] = train(run_dir, argv, args.threads)
            rows = probes(run_dir)
            scored = sorted(rows) if name != "refl_rollback" else [max(rows)]
            arms[name] = {"probes": rows, "events": events(run_dir), "trips_now": {},
                          "fidelity": {} if args.no_fidelity else fidelity(run_dir, scored, args.prompts)}
            if name != "refl_rollback":  # the warn runs' probes judged by the current rules
                arms[name]["trips_now"] = {k: v for k, v in offline_trips(rows, guard_flags).items() if v}
            # the warn runs: their probes judged by today's rules; the rollback run: what its live guard did
            shown = arms[name]["trips_now"] if name != "refl_rollback" else [
                (e["step"], e["action"]) for e in arms[name]["events"]]
            print(f"seed {seed} {name}: trips {shown}, "
                  f"fidelity { {k: round(v, 4) for k, v in arms[name]['fidelity'].items()} }", flush=True)
        report["seeds"][seed] = {"arms": arms, "summary": seed_summary(arms, end)}
    report["summary"] = over_seeds({s: v["summary"] for s, v in report["seeds"].items()})
    report["walls_s"] = walls
    (out / "guard_bench.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print(json.dumps({"per_seed": {s: v["summary"] for s, v in report["seeds"].items()},
                      "over_seeds": report["summary"], "walls_s": walls}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
