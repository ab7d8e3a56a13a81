"""Re-turbo on the shapes world: a user's style LoRA made few-step, from scratch vs from an existing DMDR student.

    python benchmarks/returbo.py --out runs/returbo                      # 1 seed, 120 steps per arm
    python benchmarks/returbo.py --out runs/returbo --seeds 2 --student runs/demo/export
    python benchmarks/returbo.py --quick --out /tmp/rt                    # the CI smoke run (a few steps)

1. **The user's adapter**: a hue-shift style LoRA trained on the committed teacher (``assets/shapes-teacher``) by
   :func:`dmdr.worlds.shapes.style.train_style_lora`; its checker (:func:`~dmdr.worlds.shapes.style.style_scores`)
   scores ``style`` (colour accuracy against the restyled prompt) and ``style_shapeeval`` (ShapeEval overall
   against it). The styled teacher's 25-step CFG sampler is the reference row.
2. **The existing student**: ``--student`` (a merged export of a shapes DMDR run), or one trained here
   (``--student-steps`` of ``recipes/shapes_dmdr.py`` on the plain teacher, exported merged). Its cost is not
   counted: it exists already.
3. Two arms per seed, each ``recipes/shapes_dmdr.py --model.teacher_adapters <style>`` in one process:
   **(a) scratch**, the recipe as it is (60-step cold start, then ReFL) with the style's reward
   (``--rl.rewards shapes-style``: the colour reward against the restyled prompt; the plain ``shapes`` reward asks
   for the unstyled colours and un-styles the student); **(b) re-turbo**, plus
   ``--model.init_generator <student> --dynamic.dynadg false --rl.start_step 0`` (the student is already few-step:
   no cold start; DynaRS's levels are the recipe's Beta(4, 1.5) throughout either way). Every ``--every`` steps
   a checkpoint is scored on held-out prompts with fixed noise.
4. The table: per arm and seed, the first scored step (and the training wall time up to it, the sum of the logged
   step times: start-up and scoring excluded) at which both scores reach scratch's final values (mean over seeds,
   minus ``--tolerance``), and each arm's scores at its end; re-turbo's step-0 row is the student with the style
   merged.

Outputs in ``--out``: ``returbo.md`` (also printed), ``returbo.json`` (every score, the commit, the settings, the
load average while it ran), the style LoRA, the student and one folder per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/returbo")
    p.add_argument("--teacher", default=str(REPO / "assets" / "shapes-teacher"))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=120, help="generator steps of each arm")
    p.add_argument("--every", type=int, default=20, help="score a checkpoint every this many steps")
    p.add_argument("--style-steps", type=int, default=400, help="steps of the style LoRA's training")
    p.add_argument("--student", default="", help="an existing student: a merged export of a shapes DMDR run")
    p.add_argument("--student-steps", type=int, default=120, help="without --student: train one this long")
    p.add_argument("--prompts", type=int, default=96, help="held-out prompts per score")
    p.add_argument("--noise-seeds", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.01, help="target = scratch's final score minus this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the CI smoke run: a few steps of everything, 8 prompts")
    p.add_argument("overrides", nargs="*", help="extra --section.field value overrides for every run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.style_steps, args.student_steps = 2, 2, 2, 2
        args.prompts, args.noise_seeds = 4, 1
        args.student = args.student or args.teacher  # any model of the architecture runs the init path
        args.overrides = ["--data.batch_size", "4", "--data.rl_batch_size", "4", "--dmd.ratio", "1", *args.overrides]
    return args


def _train(run_dir: Path, argv: list[str], threads: int) -> float:
    """The recipe in a subprocess (its log in ``<run>/train.log``); wall seconds. One line on failure."""
    from dmdr.worlds.shapes.ablations import RecipeRunFailed, run_recipe_logged  # torch: not for --help

    try:
        return run_recipe_logged(run_dir, argv, threads)
    except RecipeRunFailed as e:
        raise SystemExit(f"error: {run_dir.name} failed (exit {e.code}): {e.last_line} (log: {e.log})") from None


def _run_argv(args: argparse.Namespace, run_dir: Path, seed: int, steps: int, extra: list[str]) -> list[str]:
    return ["--model.path", args.teacher, "--train.output_dir", str(run_dir), "--train.seed", str(seed),
            "--train.max_steps", str(steps), "--checkpoint.interval", str(args.every), "--checkpoint.keep_last",
            "1000000", "--log.interval", "1", "--log.sample_interval", "0", "--log.tensorboard", "false",
            "--log.progress_bar", "false", "--guard.action", "off", *extra, *args.overrides]


def _scores(backbone, fn, prompts: list[str], noise_seeds: int, sampler) -> dict[str, float]:
    from dmdr.worlds.shapes.evaluation import sample_images
    from dmdr.worlds.shapes.scene import IMAGE_SIZE
    from dmdr.worlds.shapes.style import style_scores

    rows = [style_scores(sample_images(backbone, fn, sampler, prompts, s, IMAGE_SIZE)[0], prompts)
            for s in range(noise_seeds)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _styled_backbone(path: str, style: Path):
    """A pipeline folder loaded in fp32 with the style LoRA merged (the styled teacher, or the student + style)."""
    import torch

    from dmdr.models import load_backbone
    from dmdr.models.adapters import merge_loras, read_lora
    from dmdr.models.families import family_spec
    from dmdr.returbo import denoiser_shapes
    from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH

    backbone = load_backbone(path, dtype=torch.float32, max_sequence_length=MAX_SEQUENCE_LENGTH)
    shapes = denoiser_shapes(path, family_spec("sd3"))
    merge_loras(backbone.teacher.net, [(read_lora(style, shapes), 1.0)])
    return backbone


def _step_times(run_dir: Path) -> dict[int, float]:
    """Cumulative logged step time (s) up to each generator step."""
    total, out = 0.0, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        total += float(row.get("perf/step_time", 0.0))
        out[int(row["step"])] = total
    return out


def _score_run(run_dir: Path, args: argparse.Namespace, prompts: list[str]) -> dict[int, dict[str, float]]:
    import torch

    from dmdr.export import load_generator, read_run_config, resolve_checkpoint
    from dmdr.worlds.shapes.evaluation import Sampler

    cfg = read_run_config(run_dir)
    sampler = Sampler("few_step", cfg.dmd.num_steps, 1.0, cfg.dmd.shift, cfg.dmd.t_min, cfg.dmd.sampler)
    times = _step_times(run_dir)
    out = {}
    for step in range(args.every, args.steps + 1, args.every):
        loaded = load_generator(cfg, resolve_checkpoint(run_dir, step), dtype=torch.float32)
        out[step] = {**_scores(loaded.backbone, loaded.roles.generator_fn, prompts, args.noise_seeds, sampler),
                     "train_s": times.get(step, float("nan"))}
    return out


def _reach(curve: dict[int, dict[str, float]], target: dict[str, float]) -> tuple[int, float] | None:
    for step in sorted(curve):
        row = curve[step]
        if all(row[k] >= v for k, v in target.items()):
            return step, row.get("train_s", 0.0)
    return None


def _table(result: dict) -> str:
    target = result["target"]
    lines = [f"# Re-turbo on the shapes world ({result['commit']}, {result['date']})", "",
             f"Style: hue shift, LoRA rank 8 trained {result['settings']['style_steps']} steps. Target: scratch's "
             f"final scores minus {result['settings']['tolerance']}: style >= {target['style']:.3f}, styled ShapeEval "
             f">= {target['style_shapeeval']:.3f}. {result['settings']['prompts']} held-out prompts x "
             f"{result['settings']['noise_seeds']} noise draws per score. Load average while it ran: "
             f"{result['load']}.", "",
             "| model | seed | step reached | train s to reach | style (end) | styled ShapeEval (end) | "
             "fidelity (end) |",
             "|---|---|---|---|---|---|---|"]
    for row in result["reference"]:
        lines.append(f"| {row['label']} | | | | {row['style']:.3f} | {row['style_shapeeval']:.3f} | "
                     f"{row['style_fidelity']:.3f} |")
    for arm, seeds in result["arms"].items():
        for seed, data in seeds.items():
            end = data["curve"][str(max(int(k) for k in data["curve"]))]
            reached = data["reached"]
            lines.append(f"| {arm} | {seed} | {reached[0] if reached else 'not reached'} | "
                         f"{f'{reached[1]:.0f}' if reached else ''} | {end['style']:.3f} | "
                         f"{end['style_shapeeval']:.3f} | {end['style_fidelity']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from dmdr.provenance import source_commit
    from dmdr.worlds.shapes.evaluation import Sampler, heldout_prompts
    from dmdr.worlds.shapes.style import train_style_lora

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    prompts = heldout_prompts(args.prompts)
    style = out / "style" / "pytorch_lora_weights.safetensors"
    if not style.is_file():
        train_style_lora(args.teacher, style.parent, steps=args.style_steps)
    few = Sampler("few_step", 4, 1.0, 1.0)
    reference = []
    backbone = _styled_backbone(args.teacher, style)
    for label, sampler in (("styled teacher 25-step CFG 3", Sampler("teacher", 25, 3.0, 1.0)),
                           ("styled teacher 4-step", few)):
        reference.append({"label": label, **_scores(backbone, backbone.teacher, prompts, args.noise_seeds, sampler)})
    student = args.student
    if not student:
        run = out / "student"
        if not (run / "checkpoints" / "latest").exists():
            _train(run, _run_argv(args, run, 0, args.student_steps, []), args.threads)
        student = str(out / "student-export")
        if not (Path(student) / "dmdr_inference.json").is_file():
            from dmdr.cli import convert_to_diffusers

            assert convert_to_diffusers.main(["--run", str(run), "--out", student, "--overwrite"]) == 0
    backbone = _styled_backbone(student, style)
    reference.append({"label": "student + style merged (re-turbo step 0)",
                      **_scores(backbone, backbone.teacher, prompts, args.noise_seeds, few)})
    loads.append(os.getloadavg()[0])
    arms: dict[str, dict[str, dict]] = {"scratch": {}, "re-turbo": {}}
    extra = {"scratch": ["--model.teacher_adapters", str(style), "--rl.rewards", "shapes-style"],
             "re-turbo": ["--model.teacher_adapters", str(style), "--rl.rewards", "shapes-style",
                          "--model.init_generator", student,
                          "--dynamic.dynadg", "false", "--rl.start_step", "0"]}
    for seed in range(args.seeds):
        for arm in arms:
            run = out / f"{arm}-seed{seed}"
            wall = 0.0
            if not (run / "checkpoints" / f"step-{args.steps}").exists():
                wall = _train(run, _run_argv(args, run, seed, args.steps, extra[arm]), args.threads)
            arms[arm][str(seed)] = {"curve": {str(k): v for k, v in _score_run(run, args, prompts).items()},
                                    "wall_s": wall}
            loads.append(os.getloadavg()[0])
    finals = [d["curve"][str(args.steps)] for d in arms["scratch"].values()]
    target = {k: sum(f[k] for f in finals) / len(finals) - args.tolerance for k in ("style", "style_shapeeval")}
    for seeds in arms.values():
        for data in seeds.values():
            data["reached"] = _reach({int(k): v for k, v in data["curve"].items()}, target)
    result = {"commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "settings": {k: v for k, v in vars(args).items()}, "student": student, "style": str(style),
              "target": target, "reference": reference, "arms": arms,
              "load": f"{min(loads):.1f}-{max(loads):.1f}"}
    (out / "returbo.json").write_text(json.dumps(result, indent=1) + "\n")
    table = _table(result)
    (out / "returbo.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
