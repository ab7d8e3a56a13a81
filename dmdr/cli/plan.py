"""Will this run fit, how long will it take, and what to change: before anyone books a cluster.

    python tools/plan.py --recipe sd35_dmdr --nodes 1 --gpus-per-node 8 --gpu h100-80 \\
        [--mfu 0.4] [--model sd3.5-large | <diffusers folder>] [--json plan.json] \\
        [--parallel.activation_checkpointing none --data.batch_size 2 ...]

Any ``--section.field value`` is a recipe override (dmdr/config.py), checked like a run's. The
numbers come from the model's config files (shipped in dmdr/planning/configs, or ``--model.path``)
built on the meta device and from the project's own sharding; see dmdr/planning/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dmdr.config import apply_overrides
from dmdr.errors import UserError, error_exit
from dmdr.gpus import get_gpu
from dmdr.planning import largest_batch_table, make_plan
from dmdr.planning.report import to_json, to_table
from dmdr.recipes import get_recipe


class Progress:
    """One stderr line per planning phase with the seconds since the start (the whole plan takes 25-40 s on a
    CPU; stdout stays the table or the JSON)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, line: str) -> None:
        print(f"plan: [{time.perf_counter() - self.start:5.1f} s] {line} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        print(f"plan: [{time.perf_counter() - self.start:5.1f} s] done", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--recipe", required=True, help="a recipe name (dmdr.recipes.RECIPES), e.g. sd35_dmdr")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="h100-80")
    ap.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation the times assume (0.4)")
    ap.add_argument("--model", default="", help="a shipped model name or a diffusers folder (default: the recipe's)")
    ap.add_argument("--json", default="", help="also write the plan as JSON to this file ('-': print JSON only)")
    args, overrides = ap.parse_known_args(argv)

    try:
        gpu = get_gpu(args.gpu)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise UserError("--nodes and --gpus-per-node must be >= 1")
        if args.mfu is not None and not 0 < args.mfu <= 1:
            raise UserError(f"--mfu {args.mfu}: must be in (0, 1]")
        cfg = apply_overrides(get_recipe(args.recipe).config(), overrides)
        kwargs = {"mfu": args.mfu} if args.mfu is not None else {}
        progress = Progress()
        result = make_plan(cfg, args.gpu, gpu, args.nodes * args.gpus_per_node, recipe=args.recipe,
                           model=args.model, progress=progress, **kwargs)
        largest = largest_batch_table(cfg, result, progress=progress)
        progress.done()
    except UserError as err:
        return error_exit(err)
    data = to_json(result.plan, result.advice, largest)
    if args.json == "-":
        print(json.dumps(data, indent=2))
        return 0
    print(to_table(result.plan, result.advice, largest))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0 if result.plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
