"""Preflight: every path and required setting of a run checked before any heavy work, all problems at once.

Between config resolution and :func:`dmdr.build.build_run`, :func:`preflight_run` runs every check
of :data:`CHECKS` on the resolved :class:`~dmdr.config.TrainConfig` and collects what they find.
No check loads a model, builds a network or reads tensor data: a model folder is checked with the
family adapter's ``required_components`` and :meth:`~dmdr.models.folder.ModelFolder.check`, weight
files by their safetensors header or zip directory (:mod:`dmdr.preflight.files`), prompt sources by
planning them and reading one record; the one exception is a LoRA (``model.teacher_adapters``, a LoRA
``model.init_generator``), read whole, as it is small, to check its factors against the teacher's layers. When
anything is wrong, :class:`PreflightError` lists
**every** problem, one line each naming the setting, its value and the fix; the launcher prints it
(rank 0 only) and exits 2.

A check is a function ``check(ctx: RunContext) -> list[Problem]`` (it may also raise a
:class:`~dmdr.errors.UserError`, reported as one problem). Register one for a new family, reward
or feature with :func:`register_check`; ``ctx.facts`` carries what earlier checks learned (the
model family, parameter counts, the checkpoint a resume would take) to later checks and to the
``--dry-run`` plan (:mod:`dmdr.preflight.plan`). The tools call the same building blocks for their
own paths (:mod:`dmdr.preflight.tools`).
"""
# Importing the check modules registers their checks, the run checks first (rewards imports run_checks).
from dmdr.preflight import rewards, run_checks
from dmdr.preflight.core import (
    CHECKS,
    PreflightError,
    Problem,
    RunContext,
    format_problems,
    job_shape,
    preflight_run,
    problem_from,
    raise_problems,
    register_check,
    reports,
)

__all__ = ["Problem", "PreflightError", "RunContext", "CHECKS", "register_check", "preflight_run",
           "raise_problems", "problem_from", "format_problems", "job_shape", "reports", "rewards", "run_checks"]
