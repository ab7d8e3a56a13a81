"""The recipe entry point: recipe -> config -> preflight -> build -> resume -> train, with one-line errors.

A recipe file ends with ``sys.exit(main(my_recipe))``; ``main`` parses ``--section.field value``
overrides, runs preflight (:mod:`dmdr.preflight`: every path and required setting, checked without
loading a model; all problems in one message, printed by rank 0 only, exit 2), writes the resolved
config to ``<output_dir>/config.json``, resumes from the latest complete checkpoint
(``checkpoint.resume=auto``) and trains. ``--dry-run`` stops after preflight and prints the resolved
config and the plan of the run (exit 0, nothing loaded). A :class:`~dmdr.errors.UserError` anywhere
prints ``error: <one line>`` and exits 2; a run stopped by ``train.max_bad_steps`` non-finite steps in a
row prints one line and exits 3; one the guard stopped (:mod:`dmdr.guard`) prints one line and exits 4.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from dmdr.build import build_run
from dmdr.config import TrainConfig, apply_overrides, describe_fields, to_dict
from dmdr.distributed.env import collect_released_objects
from dmdr.engine import TrainingDiverged
from dmdr.errors import ConfigError, UserError, error_exit
from dmdr.guard import GuardStopped
from dmdr.logs import setup_logging
from dmdr.preflight import PreflightError, Problem, job_shape, preflight_run, problem_from, reports
from dmdr.preflight.files import writable_problem
from dmdr.preflight.plan import describe
from dmdr.run_folder import record_launch

log = logging.getLogger("dmdr")

DRY_RUN = "--dry-run"
DIVERGED_EXIT = 3
"""Exit code of a run stopped by ``train.max_bad_steps`` non-finite steps in a row."""
GUARD_STOP_EXIT = 4
"""Exit code of a run the guard stopped (``guard.action stop``, or a trip after the last rollback)."""


def check_output_dir(path: str) -> Path:
    """Create ``path`` if needed and prove it is writable (one clear line if not)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--train.output_dir {path!r} is not writable: {err.strerror or err}") from None
    return out


def resolve(recipe: Callable[[], TrainConfig], argv: list[str]) -> tuple[TrainConfig, list[Problem]]:
    """The recipe's config with ``argv``'s overrides, and every override or value problem (nothing raised)."""
    found: list[tuple[str, str]] = []
    cfg = apply_overrides(recipe(), argv, problems=found)
    return cfg, [problem_from(UserError(message), key) for key, message in found]


def main(recipe: Callable[[], TrainConfig], argv: list[str] | None = None,
         prepare: Callable[[TrainConfig], None] | None = None) -> int:
    """Run a recipe with command-line overrides; returns the process exit code.

    ``prepare(cfg)`` runs after the overrides and before preflight (the tiny recipe uses it to
    create its own model folder and prompt file on first use). ``--dry-run`` anywhere in ``argv``:
    preflight, print the resolved config and the plan, exit 0 without loading weights.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_help(recipe))
        return 0
    dry_run = DRY_RUN in argv
    argv = [a for a in argv if a != DRY_RUN]
    rank, local_rank, _ = job_shape()
    setup_logging(rank)
    try:
        cfg, problems = resolve(recipe, argv)
        if prepare is not None and not writable_problem(cfg.train.output_dir):
            check_output_dir(cfg.train.output_dir)
            try:
                prepare(cfg)
            except UserError as err:  # the recipe's own assets: the checks after it may depend on them
                raise PreflightError([*problems, Problem("", fix=str(err))]) from None
        ctx = preflight_run(cfg, problems)
        if dry_run:
            if rank == 0:
                print(describe(cfg, ctx))
            return 0
        return run(cfg)
    except PreflightError as err:
        # Every rank checks the same inputs; one message per node, not one per rank.
        return error_exit(err, show=reports(rank, local_rank), rank=rank)
    except GuardStopped as err:
        return error_exit(err, show=rank == 0, code=GUARD_STOP_EXIT)
    except UserError as err:
        return error_exit(err, show=not err.reported_elsewhere and (reports(rank, local_rank) or err.rank_local),
                          rank=rank)
    except TrainingDiverged as err:  # every rank agrees on finiteness: the same line everywhere
        return error_exit(err, show=reports(rank, local_rank), rank=rank, code=DIVERGED_EXIT)
    finally:
        collect_released_objects()  # a finished run must not abort at interpreter exit (see its docstring)


def run(cfg: TrainConfig) -> int:
    """Build everything from a resolved config and train; the library-level entry point."""
    check_output_dir(cfg.train.output_dir)
    session = build_run(cfg)
    try:
        if session.is_main:
            record_launch(to_dict(cfg), cfg.train.output_dir, session.resumed_from)
        session.train()
    finally:
        session.close()
    return 0


def _help(recipe: Callable[[], TrainConfig]) -> str:
    cfg = recipe()
    lines = [f"{recipe.__name__}: override any field with --section.field value (or --section.field=value);",
             "every field below shows the recipe's value and what it does.", "",
             f"  {DRY_RUN}  check every path and setting (nothing is loaded), print the resolved config and",
             "             the plan of the run (model, roles, mesh, stages, learning rates, sharding, outputs), exit"]
    return "\n".join(lines + describe_fields(cfg))
