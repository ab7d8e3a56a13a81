"""The demo: DMDR distils the committed shapes-world teacher on 2 CPU processes and is checked by ShapeEval.

    python tools/demo.py --out runs/demo            # make demo
    python tools/demo.py --out /tmp/d --quick       # the CI smoke run (same code path, tiny step counts)

Stages (each a banner; training shows the trainer's rank-0 progress bar):

1. **cold start**: ``torchrun --nproc_per_node=2 recipes/shapes_dmdr.py`` with FSDP2 over gloo, DMD with
   DynaDG + DynaRS for ``--cold-start`` generator steps; its last checkpoint is the common start of
2. three runs of ``--rl-steps`` more steps each: **DMDR** (DMD + ReFL with the world's reward),
   **DMD only** (``--rl.method none``) and **ReFL only** (``--dmd.weight 0``);
3. **export** of each with ``tools/convert_to_diffusers.py`` (DMDR's to ``<out>/export``);
4. **evaluation** on held-out prompts and several seeds, the same noise for every model: the teacher with
   25-step CFG and with the student's few-step sampler, the cold-start init, and the three students
   (loaded from their exports through the same loader as any diffusers folder);
5. ``<out>/grid.png``, ``<out>/results.json``, ``<out>/report.md`` (the table and which of the paper's
   orderings this run shows, computed from the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dmdr.errors import UserError, error_exit
from dmdr.models import load_backbone
from dmdr.recipes.shapes_dmdr import COLD_START, RL_STEPS
from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model, heldout_prompts, sample_images
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH, check_teacher_folder
from dmdr.worlds.shapes.report import claims, save_grid, write_report
from dmdr.worlds.shapes.scene import IMAGE_SIZE, split_prompts

REPO = Path(__file__).resolve().parents[2]  # the committed teacher and the launchers are in the checkout
RECIPE = REPO / "recipes" / "shapes_dmdr.py"
EXPORT_TOOL = REPO / "tools" / "convert_to_diffusers.py"


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n== {text}\n{'=' * 100}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: stage failed (exit {done.returncode}): {' '.join(cmd)}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher", default=str(REPO / "assets" / "shapes-teacher"))
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, gloo)")
    p.add_argument("--cold-start", type=int, default=None, help="generator steps of the cold start")
    p.add_argument("--rl-steps", type=int, default=None, help="generator steps of each run after the cold start")
    p.add_argument("--prompts", type=int, default=172,
                   help="held-out prompts in the evaluation (172: all of them, the tables' protocol)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny step counts and evaluation (CI smoke run)")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("overrides", nargs="*", help="extra --section.field value overrides for every training run")
    args = p.parse_args(argv)
    if args.quick:
        args.cold_start = args.cold_start or 2
        args.rl_steps = args.rl_steps or 2
        args.prompts, args.seeds = min(args.prompts, 8), min(args.seeds, 1)
    return args


def train_stages(args: argparse.Namespace, out: Path, env: dict[str, str]) -> dict[str, Path]:
    """The cold start and the three branches; returns each run's folder."""
    cold, more = args.cold_start or COLD_START, args.rl_steps or RL_STEPS
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(split_prompts("train")) + "\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                str(RECIPE), "--model.path", args.teacher, "--data.sources", str(prompts),
                "--dynamic.decay_steps", str(cold), "--rl.start_step", str(cold), "--checkpoint.interval", str(cold),
                "--log.sample_interval", str(cold), *args.overrides]
    if args.quick:
        torchrun += ["--dmd.ratio", "2", "--log.interval", "1"]
    runs = {"coldstart": out / "coldstart", "dmdr": out / "dmdr", "dmd": out / "dmd", "refl": out / "refl"}
    banner(f"1/5 cold start: DMD with DynaDG + DynaRS, {cold} generator steps on {args.nproc} processes (FSDP2, gloo)")
    run([*torchrun, "--train.output_dir", str(runs["coldstart"]), "--train.max_steps", str(cold)], env)
    start = runs["coldstart"] / "checkpoints" / f"step-{cold}"
    branches = {"dmdr": ("DMDR: DMD + ReFL (shapes reward)", []),
                "dmd": ("DMD only (no RL)", ["--rl.method", "none", "--data.rl_batch_for_distill", "true"]),
                "refl": ("ReFL only (no DMD loss)", ["--dmd.weight", "0"])}
    for i, (name, (title, extra)) in enumerate(branches.items()):
        banner(f"2/5 ({i + 1}/3) {title}: {more} generator steps from the cold start's step {cold}")
        run([*torchrun, "--train.output_dir", str(runs[name]), "--checkpoint.resume", str(start),
             "--train.max_steps", str(cold + more), *extra], env)
    return runs


def export_stage(runs: dict[str, Path], out: Path, env: dict[str, str], teacher: Path) -> dict[str, Path]:
    banner("3/5 export: tools/convert_to_diffusers.py for every run (DMDR's to <out>/export)")
    exports = {name: (out / "export" if name == "dmdr" else run_dir / "export") for name, run_dir in runs.items()}
    for name, run_dir in runs.items():
        run([sys.executable, str(EXPORT_TOOL), "--run", str(run_dir), "--out", str(exports[name]), "--overwrite"], env)
        shutil.copy(teacher / "world.json", exports[name] / "world.json")  # the student lives in the same world
    return exports


def evaluate_stage(args: argparse.Namespace, exports: dict[str, Path], out: Path) -> None:
    cfg = json.loads((out / "dmdr" / "config.json").read_text())
    n, shift, w0 = cfg["dmd"]["num_steps"], cfg["dmd"]["shift"], cfg["dmd"]["guidance"]
    banner(f"4/5 evaluation: {args.prompts} held-out prompts x {args.seeds} seeds, same noise for every model")

    def load(folder: Path):
        return load_backbone(folder, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)

    models = [(f"teacher 25-step CFG {w0:g}", Path(args.teacher), Sampler("teacher", 25, w0, 1.0)),
              (f"teacher {n}-step", Path(args.teacher), Sampler("few_step", n, 1.0, shift)),
              (f"cold-start init {n}-step", exports["coldstart"], Sampler("few_step", n, 1.0, shift)),
              (f"DMD only {n}-step", exports["dmd"], Sampler("few_step", n, 1.0, shift)),
              (f"DMDR {n}-step", exports["dmdr"], Sampler("few_step", n, 1.0, shift)),
              (f"ReFL only {n}-step", exports["refl"], Sampler("few_step", n, 1.0, shift))]
    prompts, seeds = heldout_prompts(args.prompts), list(range(args.seeds))
    grid_prompts = heldout_prompts(12)
    rows, grid = [], []
    for name, folder, sampler in models:
        backbone = load(folder)
        row = evaluate_model(backbone, backbone.teacher, sampler, prompts, seeds, IMAGE_SIZE)
        rows.append({"model": name, "path": str(folder), **row})
        s = row["scores"]
        print(f"{name:28s} ShapeEval {s['overall']['mean']:.3f}  fidelity {s['fidelity']['mean']:.3f}  "
              f"reward {s['reward']['mean']:.3f}  ({row['wall_s']:.1f} s)", flush=True)
        grid.append((name, sample_images(backbone, backbone.teacher, sampler, grid_prompts, 0, IMAGE_SIZE)[0]))
    banner("5/5 report")
    names = [m[0] for m in models]
    checked = claims({r["model"]: r for r in rows}, names[0], names[1], names[3], names[4], names[5], init=names[2])
    header = (f"# dmdr demo: the shapes world\n\n{time.strftime('%Y-%m-%d %H:%M')}, held-out prompts: {len(prompts)}, "
              f"seeds: {len(seeds)}, student steps N = {n} (shift {shift}), real-score guidance w0 = {w0}.\n\n"
              f"Grid (`grid.png`): rows are models, columns the prompts {grid_prompts}, seed 0.")
    write_report(out, rows, checked, header)
    save_grid(grid, out / "grid.png")
    print((out / "report.md").read_text(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.time()
    out = Path(args.out)
    try:
        check_teacher_folder(args.teacher)
    except UserError as e:
        return error_exit(e)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            return error_exit(UserError(f"--out {out} exists and is not empty; pass --overwrite to start over"))
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = train_stages(args, out, env)
    exports = export_stage(runs, out, env, Path(args.teacher))
    evaluate_stage(args, exports, out)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min: {out}/report.md, {out}/grid.png, {out}/export",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
