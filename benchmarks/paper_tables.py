"""The paper's ablations, Tables 4 and 5, in miniature on the shapes world's committed teacher, with seeds.

    python benchmarks/paper_tables.py                          # both tables, 3 seeds (make paper-tables)
    python benchmarks/paper_tables.py --table 4 --seeds 2 --out runs/t4
    python benchmarks/paper_tables.py --quick --out /tmp/pt    # the CI smoke run: 1 seed, a few steps

**Table 4** (the dynamic cold start): vanilla DMD, +DynaDG, +DynaRS (DynaDG and DynaRS) and -Dynamic (both
held at their step-0 values), each a cold start of ``--cold-steps`` generator steps scored at half and all of
them (the paper's 1000 and 2000 iterations). **Table 5** (RL and DMD): from the +DynaRS cold start of each seed,
only distill, and for ReFL, DPO and GRPO only RL and distill + RL, ``--rl-steps`` more steps each, scored every
``--curve-every`` steps for the reward-hacking plot. The runs and their scoring: :mod:`dmdr.worlds.shapes.ablations`;
the tables and the orderings checked against the paper's: :mod:`dmdr.worlds.shapes.tables`.

Outputs in ``--out``: ``paper_tables.md`` (also printed), ``paper_tables.json`` (every number, per seed, with
the commit, each row's config and wall time), ``hacking.png``, and one folder per run (``train.log``,
``metrics.jsonl``, its last checkpoint, ``result.json``). The runs go ``--jobs`` at a time (default: one per
core, one thread each). Finished runs are kept: rerunning the same command re-scores nothing and trains only
what is missing (``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=("4", "5", "all"), default="all")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per row (mean ± std over them)")
    p.add_argument("--out", default="runs/paper-tables")
    p.add_argument("--teacher", default=str(REPO / "assets" / "shapes-teacher"))
    p.add_argument("--cold-steps", type=int, default=None, help="generator steps of a cold start (Table 4's longer "
                   "count; default the recipe's COLD_START)")
    p.add_argument("--rl-steps", type=int, default=None, help="generator steps of each Table 5 run after the cold "
                   "start (default the recipe's RL_STEPS)")
    p.add_argument("--curve-every", type=int, default=10, help="Table 5: score a checkpoint every this many steps")
    p.add_argument("--prompts", type=int, default=0, help="held-out prompts every checkpoint is scored on (0: all)")
    p.add_argument("--noise-seeds", type=int, default=2, help="noise draws per prompt, the same for every model")
    p.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                   help="generator weights a checkpoint is scored with (auto: the EMA when the run keeps one)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (one thread each)")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps, 8 prompts x 1 noise draw (CI smoke run)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    p.add_argument("overrides", nargs="*", help="extra --section.field value overrides for every training run")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.cold_steps, args.rl_steps = args.cold_steps or 2, args.rl_steps or 2
        args.curve_every, args.prompts, args.noise_seeds = 1, 8, 1
    if args.prompts < 0:
        p.error("--prompts must be >= 0 (0: every held-out prompt)")
    for name in ("seeds", "jobs", "curve_every", "noise_seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settings(args: argparse.Namespace):
    from dmdr.recipes.shapes_dmdr import COLD_START, RL_STEPS
    from dmdr.worlds.shapes.ablations import Settings

    tables = (4, 5) if args.table == "all" else (int(args.table),)
    cold, rl = args.cold_steps or COLD_START, args.rl_steps or RL_STEPS
    if cold < 2 or rl < 1:
        raise SystemExit("error: --cold-steps must be >= 2 (Table 4 scores half of it) and --rl-steps >= 1")
    return Settings(out=str(Path(args.out).resolve()), teacher=str(Path(args.teacher).resolve()), tables=tables,
                    seeds=args.seeds, cold_steps=cold, rl_steps=rl, curve_every=args.curve_every,
                    prompts=args.prompts, noise_seeds=args.noise_seeds, quick=args.quick,
                    weights=args.weights, overrides=tuple(args.overrides), jobs=args.jobs)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_all(jobs: list, s, workers: int) -> dict[str, dict]:
    """Run the jobs ``workers`` at a time, each after its ``after``; print one progress line per finished job."""
    from dmdr.worlds.shapes.ablations import expected_wall, run_job

    threads = 1 if workers > 1 else (os.cpu_count() or 1)
    pending = {j.name: j for j in jobs}
    results: dict[str, dict] = {}
    running: dict[Future, object] = {}
    start, spent_est, spent_real = time.time(), 0.0, 0.0
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        while pending or running:
            for name, job in list(pending.items()):
                if len(running) >= workers:
                    break
                if job.after and job.after not in results:
                    continue
                running[pool.submit(run_job, job, s.teacher, threads)] = job
                del pending[name]
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - one line, then the other jobs stop
                    for f in running:
                        f.cancel()
                    raise SystemExit(f"error: {err}") from None
                results[job.name] = result
                took = result.get("train_s", 0.0) + result.get("score_s", 0.0)
                if not result.get("cached"):
                    spent_est, spent_real = spent_est + job.cost, spent_real + took
                speed = spent_real / spent_est if spent_est else 1.0
                left = [j for j in jobs if j.name not in results]
                eta = expected_wall(left, workers) * speed
                first = next(iter(result.get("scores", {}).values()), None)
                last = list(result.get("scores", {}).values())[-1] if first else None
                score = f"ShapeEval {first['overall']:.3f} -> {last['overall']:.3f}" if first else ""
                how = "cached" if result.get("cached") else f"{took:.0f} s"
                print(f"[{len(results)}/{len(jobs)}] {job.name}: {how} {score} | elapsed "
                      f"{_minutes(time.time() - start)}, about {_minutes(eta)} left", flush=True)
    return results


def write_outputs(results: dict[str, dict], s, wall: float, argv: list[str]) -> str:
    from dmdr.provenance import source_commit
    from dmdr.worlds.shapes import tables
    from dmdr.worlds.shapes.ablations import scored_prompts

    out = Path(s.out)
    reference = results["reference"]["rows"]
    trained = sum(r.get("train_s", 0.0) + r.get("score_s", 0.0) for r in results.values())
    commits: dict[str, int] = {}
    for r in results.values():  # rows reused from an earlier invocation may come from an earlier commit
        commits[r.get("commit", "unknown")] = commits.get(r.get("commit", "unknown"), 0) + 1
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": source_commit(), "job_commits": commits,
                    "command": "python benchmarks/paper_tables.py " + " ".join(argv), "settings": s.__dict__,
                    "wall_s": wall, "run_s": trained, "reference": reference}
    made = ", ".join(f"{c} ({n} jobs)" for c, n in commits.items())
    sections = [f"# DMDR's ablations in miniature (shapes world)\n\n{report['date']}, commit {report['commit']} "
                f"(the jobs ran at {made}), "
                f"{s.seeds} training seed(s) per row, cold start {s.cold_steps} generator steps, RL stage "
                f"{s.rl_steps} steps, scored on {len(scored_prompts(s.prompts))} held-out prompts x {s.noise_seeds} "
                "noise draws (the same for every model); "
                f"wall time {_minutes(wall)} ({_minutes(trained)} of training and scoring over all runs, on "
                f"{s.jobs} cores).\nCells: mean ± std over seeds; ShapeEval is `overall` (mean of the "
                "colour, shape, count and position accuracies); fidelity is the fraction of pixels that are clean "
                "background or belong to an object; reward is the world's colour reward (the RL reward: blind to "
                "shape, count and position).\n\nThe teacher on the same prompts and noise:\n\n"
                + tables.markdown_reference(reference)]
    claims = []
    if 4 in s.tables:
        rows4 = tables.table4(results, s)
        claims += tables.claims4(rows4, s)
        report["table4"] = rows4
        sections.append(f"## Table 4: the dynamic cold start\n\n{tables.markdown4(rows4, s)}")
    if 5 in s.tables:
        rows5 = tables.table5(results, s)
        curve = tables.curves(results, s)
        claims += tables.claims5(rows5)
        report["table5"], report["curves"] = rows5, curve
        tables.plot_hacking(curve, out / "hacking.png")
        sections.append(f"## Table 5: RL and DMD, from the +DynaRS cold start\n\n{tables.markdown5(rows5)}\n\n"
                        "Reward hacking over the RL stage: `hacking.png`.")
    report["claims"] = claims
    sections.append(f"## The paper's orderings, here and in the paper\n\n{tables.markdown_claims(claims)}")
    text = "\n\n".join(sections) + "\n"
    (out / "paper_tables.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "paper_tables.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from dmdr.errors import UserError
    from dmdr.worlds.shapes.ablations import expected_wall, plan_jobs
    from dmdr.worlds.shapes.pipeline import check_teacher_folder
    from dmdr.worlds.shapes.scene import split_prompts

    try:
        check_teacher_folder(args.teacher)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = settings(args)
    out = Path(s.out)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("\n".join(split_prompts("train")) + "\n")
    jobs = plan_jobs(s)
    workers = min(args.jobs, len(jobs))
    print(f"paper_tables: {len(jobs)} jobs (tables {', '.join(map(str, s.tables))}, {s.seeds} seed(s)), {workers} at "
          f"a time; expected wall time about {_minutes(expected_wall(jobs, workers))} on an idle 2-core machine "
          f"(more if it is shared). Runs and logs: {out}", flush=True)
    start = time.time()
    results = run_all(jobs, s, workers)
    text = write_outputs(results, s, time.time() - start, argv)
    print("\n" + text, flush=True)
    print(f"paper_tables finished in {_minutes(time.time() - start)}: {out}/paper_tables.md, "
          f"{out}/paper_tables.json" + (f", {out}/hacking.png" if 5 in s.tables else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
