"""The paper's metrics for any model, in one command: CLIP score, aesthetic, PickScore, HPSv2.1, LPIPS diversity.

    python tools/eval.py --model release/sd35-dmdr-4step --prompts prompts.txt --seeds 4 --out eval/sd35 \\
        --clip-model /models/clip-vit-large-patch14 --aesthetic-head /models/sac+logos+ava1-l14-linearMSE.pth \\
        --pickscore-model /models/PickScore_v1 --hps-checkpoint /models/HPS_v2.1_compressed.pt \\
        --lpips-weights /models/lpips_alex.pth
    python tools/eval.py --compare /models/sd3.5-large release/sd35-dmdr-4step runs/sd35/checkpoints/step-4000 \\
        --prompts prompts.txt --out eval/compare ...
    torchrun --nproc_per_node=8 tools/eval.py --model ... (prompts split across ranks, gathered on rank 0)

A model is an exported few-step folder (its saved schedule), a base diffusers folder (the teacher: its
multi-step CFG sampler, ``--steps`` default 28, ``--guidance`` default 7), a training checkpoint
``<output_dir>/checkpoints/step-N`` or a run folder (its latest checkpoint; ``--weights`` / ``--ema``).
Every model samples the same noise for the same (prompt, seed), so models compare image by image.
A metric whose checkpoint is not given is skipped with a one-line note; ``--plugin MODULE`` imports a
module that registers more metrics (:func:`dmdr.evaluation.register_metric`). Writes ``results.md`` (the
table: mean ± std [95% bootstrap CI], NFE, images/s), ``results.json`` (with every score) and
``grid.png`` (rows = prompts, columns = models) to ``--out``. Bad input prints one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dmdr.cli import run_tool
from dmdr.devices import DTYPES, pick_device
from dmdr.distributed.env import collect_released_objects, init_distributed
from dmdr.errors import ConfigError, DataError, UserError
from dmdr.evaluation import select_metrics
from dmdr.evaluation.report import markdown_table, summaries, write_report
from dmdr.evaluation.runner import evaluate_model
from dmdr.evaluation.samplers import load_model, model_kind
from dmdr.export import SETTINGS_FILE

METRIC_FLAGS = {
    "clip_model": "CLIP folder (open_clip or transformers) for the CLIP score",
    "aesthetic_head": "LAION aesthetic MLP head state dict (sac+logos+ava1-l14-linearMSE.pth)",
    "aesthetic_clip": "CLIP ViT-L/14 folder for the aesthetic head (default: --clip-model)",
    "pickscore_model": "PickScore folder (transformers CLIPModel)",
    "hps_checkpoint": "HPSv2.1 checkpoint file (HPS_v2.1_compressed.pt)",
    "hps_arch": "open_clip architecture of the HPS checkpoint (default ViT-H-14)",
    "lpips_weights": "one lpips.LPIPS state dict (trunk + lin layers) for diversity",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an exported folder, a base diffusers folder, a checkpoint or a run folder")
    which.add_argument("--compare", nargs="+", metavar="MODEL", help="several models on the same prompts and noise")
    parser.add_argument("--prompts", required=True, help="a UTF-8 text file, one prompt a line")
    parser.add_argument("--out", default="eval", help="output folder (default: eval)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: each model's own; base 28); with --compare the base "
                             "models' only")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale of base models (default 7.0)")
    parser.add_argument("--seeds", type=int, default=1, help="images per prompt, seeds --seed .. --seed+S-1")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--metrics", nargs="+", default=None, help="metric names (default: every registered one)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling batch (per rank)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: each model's own)")
    parser.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                        help="checkpoints: the generator's EMA, the trained weights, or auto (EMA when saved)")
    parser.add_argument("--ema", action="store_true", help="checkpoints: the EMA weights (= --weights ema)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights of the sampled models")
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts (rows) in grid.png")
    parser.add_argument("--save-images", action="store_true", help="also write <out>/<model>/pNNNNN-sS.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for key, help_text in METRIC_FLAGS.items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, default="", help=help_text)
    parser.add_argument("--metric-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of a (plugged-in) metric, e.g. lpips_net=vgg; repeatable")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: it registers more metrics (register_metric); repeatable")
    return parser.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    """One prompt a line (blank lines dropped); an unreadable, binary or empty file is one line."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"--prompts {p}: cannot read it ({e.strerror or e})") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts {p}: not a UTF-8 text file (byte {e.start}: {e.reason}); give one prompt "
                        "a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompts {p}: has no prompts (one prompt a line)")
    return prompts


def metric_options(args: argparse.Namespace) -> dict[str, str]:
    options = {key: getattr(args, key) for key in METRIC_FLAGS}
    for item in args.metric_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--metric-option {item!r}: write KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def import_plugins(modules: list[str]) -> None:
    """Import each ``--plugin`` module (it calls :func:`dmdr.evaluation.register_metric`); one line if it fails."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--plugin {name}: cannot import it ({e})") from None


def shapes_world(path: str) -> bool:
    """Whether ``path`` is a shapes-world model: ``world.json`` in it, or in the teacher its export or run records."""
    import json

    p = Path(path).expanduser()
    if (p / "world.json").is_file():
        return True
    teacher = ""
    try:
        if (p / SETTINGS_FILE).is_file():
            teacher = json.loads((p / SETTINGS_FILE).read_text()).get("source", {}).get("teacher", "")
        else:
            run = p if (p / "config.json").is_file() else p.parent.parent
            teacher = json.loads((run / "config.json").read_text()).get("model", {}).get("path", "")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(teacher) and (Path(teacher) / "world.json").is_file()


def run(args: argparse.Namespace, env) -> int:
    if args.seeds < 1 or args.seed < 0 or args.batch_size < 1 or args.grid_prompts < 0:
        raise ConfigError("--seeds and --batch-size must be >= 1, --seed and --grid-prompts >= 0")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be >= 1")
    prompts = read_prompts(args.prompts)
    import_plugins(args.plugin)
    paths = [args.model] if args.model else list(args.compare)
    kinds = [model_kind(path) for path in paths]  # every path checked before any slow load
    weights = "ema" if args.ema else args.weights
    seeds = list(range(args.seed, args.seed + args.seeds))
    options = metric_options(args)
    device = pick_device(args.device, auto=env.device)
    log = logging.getLogger("dmdr")
    wanted = args.metrics
    worlds = [p for p in paths if shapes_world(p)]
    if wanted is None and worlds:
        wanted = ["shapeeval", *(m.name for m in select_metrics(None))]
        if env.is_main:
            log.info("%s: a shapes-world model (world.json), so ShapeEval is scored too (--metrics chooses)",
                     Path(worlds[0]).name)
    chosen, skipped = [], {}
    for metric in select_metrics(wanted):
        note = metric.check(options)
        if note is None and args.seeds < metric.min_seeds:
            note = f"needs --seeds >= {metric.min_seeds}"
        if note is None:
            chosen.append(metric)
        else:
            skipped[metric.name] = note
            if env.is_main:
                log.info("metric %s skipped: %s", metric.name, note)
    if not chosen and env.is_main:
        log.warning("no metric can run, so the table has only NFE and speed: give a metric's checkpoint (%s), or "
                    "--metrics shapeeval for a shapes-world model", ", ".join(f"--{k.replace('_', '-')}"
                                                                                for k in METRIC_FLAGS))
    scorers = [(m, m.load(options, device)) for m in chosen]  # a wrong checkpoint fails here, before sampling
    results, names = [], []
    for i, path in enumerate(paths):
        name = Path(path).expanduser().resolve().name
        name = name if name not in names else f"{name}-{i}"
        names.append(name)
        # --compare: --steps is the base models' (a teacher at 25 steps next to a 2-step student keeps the student's
        # own steps); a single --model takes it whatever it is.
        steps = args.steps if (args.model or kinds[i] == "base") else None
        if args.steps is not None and steps is None and env.is_main:
            log.info("%s: a few-step generator, sampled at its own steps (--steps applies to the base models in "
                     "--compare; score it alone with --model to change its steps)", name)
        model = load_model(path, device=device, dtype=DTYPES[args.dtype], steps=steps, guidance=args.guidance,
                           weights=weights, resolution=args.resolution or (results[0].resolution if results else None),
                           name=name)
        if model.guidance is None and args.guidance is not None and env.is_main:
            log.info("%s: a few-step generator, sampled without CFG (--guidance applies to base models)", name)
        save_dir = Path(args.out) / name if args.save_images else None
        results.append(evaluate_model(model, prompts, seeds, scorers, env=env, batch_size=args.batch_size,
                                      grid_prompts=args.grid_prompts, progress=not args.no_progress,
                                      save_dir=save_dir))
        del model
    if not env.is_main:
        return 0
    metric_names = [m.name for m in chosen]
    settings = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "weights": weights,
                "dtype": args.dtype, "world_size": env.world_size, "batch_size": args.batch_size}
    written = write_report(results, Path(args.out), prompts=prompts, seeds=seeds, metric_names=metric_names,
                           skipped=skipped, settings=settings)
    print(markdown_table(summaries(results), metric_names), end="")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def run_on_ranks(args: argparse.Namespace) -> int:
    """:func:`run` on this process's rank of the job (one rank outside torchrun); rank 0 reports an error."""
    env = None
    try:
        env = init_distributed("cuda" if args.device.startswith("cuda") else
                               "cpu" if args.device == "cpu" else "auto")
        return run(args, env)
    except UserError as e:
        e.reported_elsewhere = e.reported_elsewhere or (env is not None and not env.is_main)
        raise
    finally:
        if env is not None:
            env.destroy()
        collect_released_objects()


def main(argv: list[str] | None = None) -> int:
    return run_tool(parse, run_on_ranks, argv)


if __name__ == "__main__":
    sys.exit(main())
