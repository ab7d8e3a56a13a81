"""Does the guard catch reward hacking before it costs fidelity, without false alarms? On the shapes world.

    python benchmarks/guard_shapes.py --out runs/guard-bench [--cold-start 60 --rl-steps 60 --interval 10]

Stages (one process at a time, ``--threads`` threads each):

1. the shapes recipe's cold start (DMD with DynaDG + DynaRS, guard off);
2. from its last checkpoint, with ``--guard.action warn`` and a checkpoint at every probe: **ReFL only**
   (``--dmd.weight 0``, the arm that hacks the colour reward) and **DMDR**;
3. **ReFL only** again with ``--guard.action rollback``;
4. every checkpoint of 2 and the end of 3 scored with ShapeEval's fidelity (which the guard never sees: its
   rules use only the real-model signals of :mod:`dmdr.guard.probe`).

Prints and writes ``<out>/guard_bench.json``: each arm's probe signals, trips and fidelity per step; the
detection step on ReFL only vs the first step where its fidelity falls below DMDR's; DMDR's false alarms;
the final fidelity of the rollback run vs the unguarded one.
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/guard-bench")
    p.add_argument("--cold-start", type=int, default=60)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--interval", type=int, default=10, help="guard.interval (and the scored checkpoints)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts in each fidelity score")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-rollback", action="store_true")
    p.add_argument("--max-rollbacks", type=int, default=3, help="guard.max_rollbacks of the rollback run")
    p.add_argument("overrides", nargs="*", help="extra --section.field value overrides for every run")
    return p.parse_args(argv)


GUARD_STOP_EXIT = 4  # dmdr.launch: the guard stopped the run (a trip after the last allowed rollback)


def train(run_dir: Path, argv: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
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
            out[step] = [t.rule for t in evaluate(rows[step], rows[steps[0]], history, g)]
    return out


def fidelity(run_dir: Path, steps: list[int], prompts: int) -> dict[int, float]:
    from dmdr.worlds.shapes.ablations import score_checkpoint

    out = {}
    for step in steps:
        if (run_dir / "checkpoints" / f"step-{step}").is_dir():
            out[step] = score_checkpoint(run_dir, step, prompts)["fidelity"]
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
    walls = {}
    cold_dir = out / "coldstart"
    if not (cold_dir / "checkpoints" / f"step-{cold}").is_dir():
        walls["coldstart"] = train(cold_dir, [*common, "--guard.action", "off", "--train.max_steps", str(cold),
                                              "--checkpoint.interval", str(cold)], args.threads)
    start = str(cold_dir / "checkpoints" / f"step-{cold}")
    branch = [*common, "--train.max_steps", str(end), "--guard.interval", str(args.interval),
              "--checkpoint.interval", str(args.interval), "--checkpoint.keep_last", "1000", "--checkpoint.resume",
              start]
    arms = {"refl": ["--dmd.weight", "0", "--guard.action", "warn"], "dmdr": ["--guard.action", "warn"]}
    if not args.skip_rollback:
        arms["refl_rollback"] = ["--dmd.weight", "0", "--guard.action", "rollback", "--guard.max_rollbacks",
                                 str(args.max_rollbacks)]
    report: dict = {"args": vars(args), "arms": {}}
    for name, extra in arms.items():
        run_dir = out / name
        if not (run_dir / "checkpoints" / "latest").exists() or _latest(run_dir) < end and not events(run_dir):
            walls[name] = train(run_dir, [*branch, *extra], args.threads)
        steps = sorted(probes(run_dir))
        scored = steps if name != "refl_rollback" else [_latest(run_dir)]
        report["arms"][name] = {"probes": probes(run_dir), "events": events(run_dir),
                                "fidelity": fidelity(run_dir, scored, args.prompts)}
        print(f"{name}: trips at {[e['step'] for e in events(run_dir)]}, fidelity "
              f"{ {k: round(v, 4) for k, v in report['arms'][name]['fidelity'].items()} }", flush=True)
    refl, dmdr = report["arms"]["refl"], report["arms"]["dmdr"]
    guard_overrides = [a for i, a in enumerate(args.overrides) if a.startswith("--guard.")
                       or (i and args.overrides[i - 1].startswith("--guard."))]
    for arm in (refl, dmdr):  # the warn runs' probes judged by the current rules
        arm["trips_now"] = {k: v for k, v in offline_trips(arm["probes"], guard_overrides).items() if v}
    detect = min(refl["trips_now"], default=None)
    below = next((s for s in sorted(refl["fidelity"]) if s in dmdr["fidelity"]
                  and refl["fidelity"][s] < dmdr["fidelity"][s]), None)
    summary = {"refl_detection_step": detect, "refl_first_step_below_dmdr_fidelity": below,
               "detected_before_fidelity_fell": detect is not None and (below is None or detect <= below),
               "refl_trips": refl["trips_now"], "dmdr_false_alarms": len(dmdr["trips_now"]),
               "dmdr_trips": dmdr["trips_now"], "walls_s": walls}
    if "refl_rollback" in report["arms"]:
        summary["final_fidelity_refl"] = refl["fidelity"].get(end)
        rolled = report["arms"]["refl_rollback"]
        summary["refl_rollback_final_step"] = max(rolled["fidelity"], default=None)
        summary["final_fidelity_refl_rollback"] = next(iter(rolled["fidelity"].values()), None)
        summary["refl_rollback_actions"] = [(e["step"], e["action"]) for e in rolled["events"]]
    report["summary"] = summary
    (out / "guard_bench.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
