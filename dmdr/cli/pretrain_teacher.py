"""Train the shapes world's teacher from scratch and save it as a StableDiffusion3Pipeline folder.

    python tools/pretrain_teacher.py --out assets/shapes-teacher            # the committed teacher
    python tools/pretrain_teacher.py --out /tmp/t --steps 300 --vae-steps 100   # a quick one

First the autoencoder, then the text encoders and the transformer by flow matching
(:mod:`dmdr.worlds.shapes.pretrain`); the EMA weights are saved. Every ``--eval-every`` steps (and at
the end) the current teacher is saved to ``<out>.step-<N>`` and scored on held-out prompts with
ShapeEval: the multi-step CFG sampler at each ``--guidance`` and the few-step sampler (no CFG) at each
``--few-steps``. ``<out>/world.json`` records the command, the commit, the settings, the wall time and
those scores; ``<out>/pretrain_report.md`` shows them as a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from dmdr.cli import run_tool
from dmdr.models import load_backbone
from dmdr.provenance import source_commit
from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model, heldout_prompts
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH, save_pipeline
from dmdr.worlds.shapes.pretrain import PretrainConfig, pretrain
from dmdr.worlds.shapes.scene import IMAGE_SIZE


def evaluate_folder(folder: Path, guidances: list[float], few_steps: list[int], prompts: int, seeds: int,
                    shift: float) -> list[dict]:
    """ShapeEval rows of a saved teacher: multi-step CFG at each guidance, few-step without CFG."""
    backbone = load_backbone(folder, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    names = heldout_prompts(prompts)
    samplers = [(f"teacher 25-step CFG {w:g}", Sampler("teacher", 25, w, shift)) for w in guidances]
    samplers += [(f"teacher {n}-step", Sampler("few_step", n, 1.0, shift)) for n in few_steps]
    rows = []
    for name, sampler in samplers:
        row = evaluate_model(backbone, backbone.teacher, sampler, names, list(range(seeds)), IMAGE_SIZE)
        rows.append({"model": name, **row})
        s = row["scores"]
        logging.getLogger("dmdr").info("%-26s shapeeval %.3f  fidelity %.3f  reward %.3f", name,
                                       s["overall"]["mean"], s["fidelity"]["mean"], s["reward"]["mean"])
    return rows


def table(rows: list[dict]) -> str:
    keys = ("overall", "colour", "shape", "count", "position", "exact", "fidelity", "reward")
    lines = ["| model | nfe | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r['scores'][k]['mean']:.3f}" for k in keys]
        lines.append(f"| {r['model']} | {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (a StableDiffusion3Pipeline folder)")
    for f in fields(PretrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=getattr(defaults, f.name))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="teacher steps between intermediate saves + scores")
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--eval-seeds", type=int, default=1)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.5])
    parser.add_argument("--few-steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shift", type=float, default=1.0, help="shift of the sampling levels in the evaluation")
    parser.add_argument("--rescore", action="store_true",
                        help="do not train: score the existing --out teacher again and rewrite its report")
    args = parser.parse_args(argv)
    args.command = "python tools/pretrain_teacher.py " + " ".join(argv)  # recorded in world.json
    return args


def train_and_score(args: argparse.Namespace) -> str:
    """Train (unless ``--rescore``), score, write ``world.json`` and the report; the score table."""
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    out = Path(args.out)
    command = args.command
    history: list[dict] = []

    def on_eval(step: int, components: dict) -> None:
        folder = out.with_name(f"{out.name}.step-{step}")
        shutil.rmtree(folder, ignore_errors=True)
        save_pipeline(components, folder, {"step": step})
        rows = evaluate_folder(folder, args.guidance, args.few_steps, args.eval_prompts, 1, args.shift)
        history.append({"step": step, "rows": [{"model": r["model"], "scores": r["scores"]} for r in rows]})

    start = time.time()
    if not args.rescore:
        components, stats = pretrain(cfg, on_eval=on_eval, eval_every=args.eval_every)
        shutil.rmtree(out, ignore_errors=True)
        save_pipeline(components, out, {"command": command, "commit": source_commit(), "stats": stats})
    rows = evaluate_folder(out, args.guidance, args.few_steps, args.eval_prompts, args.eval_seeds, args.shift)
    info = json.loads((out / "world.json").read_text())
    if args.rescore:
        info["rescored"] = {"command": command, "commit": source_commit(), "time": time.strftime("%Y-%m-%d %H:%M")}
    else:
        info.update({"wall_s": time.time() - start, "history": history, "torch": torch.__version__,
                     "threads": args.threads})
    info["evaluation"] = rows
    (out / "world.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out / "pretrain_report.md").write_text(
        f"# Shapes-world teacher\n\n`{command}` (commit {info['commit']}), {info['wall_s'] / 60:.1f} min on "
        f"{args.threads} threads.\n\nHeld-out prompts: {args.eval_prompts}, seeds: {args.eval_seeds}, "
        f"sampling shift {args.shift}.\n\n{table(rows)}\n")
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    return run_tool(parse, train_and_score, argv)


if __name__ == "__main__":
    sys.exit(main())
