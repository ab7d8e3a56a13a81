"""The preflight machinery: problems, the check registry, the run context and :func:`preflight_run`.

The package doc (:mod:`dmdr.preflight`) says what preflight checks and how a check is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dmdr.errors import UserError

_UNSET = object()


@dataclass(frozen=True)
class Problem:
    """One thing to fix: ``--<setting> <value>: <fix>``.

    Attributes:
        setting: the config key (``model.path``) or tool flag (``run``) at fault, without dashes.
        value: its value, shown with ``repr``; omitted when the fix already shows it.
        fix: what is wrong and what to do.
    """

    setting: str
    value: Any = _UNSET
    fix: str = ""

    def __str__(self) -> str:
        if not self.setting:
            return self.fix
        name = f"--{self.setting}"
        shown = "" if self.value is _UNSET else f" {self.value!r}"
        return f"{name}{shown}: {self.fix}"


class PreflightError(UserError):
    """Every problem preflight found; its message is one line per problem."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: list[Problem]) -> str:
    if len(problems) == 1:
        return str(problems[0])
    lines = "\n".join(f"  {p}" for p in problems)
    return f"{len(problems)} problems found before any work (fix them all, then relaunch):\n{lines}"


def raise_problems(problems: Iterable[Problem]) -> None:
    """Raise :class:`PreflightError` when ``problems`` is not empty."""
    problems = list(problems)
    if problems:
        raise PreflightError(problems)


def problem_from(err: UserError, setting: str, value: Any = _UNSET) -> Problem:
    """A :class:`Problem` from a library error, dropping a leading ``--<setting>`` it already has."""
    text = str(err)
    for prefix in (f"--{setting}: ", f"--{setting} "):
        if text.startswith(prefix):
            return Problem(setting, fix=text[len(prefix):]) if value is _UNSET else Problem(setting, value,
                                                                                             text[len(prefix):])
    return Problem(setting, value, text)


@dataclass
class RunContext:
    """What a check sees: the resolved config, the job's shape, and facts earlier checks found."""

    cfg: Any
    world_size: int = 1
    rank: int = 0
    facts: dict[str, Any] = field(default_factory=dict)


Check = Callable[[RunContext], list[Problem]]
CHECKS: list[Check] = []
"""The run checks, in order (later checks may read ``ctx.facts`` set by earlier ones)."""


def register_check(check: Check) -> Check:
    """Add ``check`` to :data:`CHECKS` (usable as a decorator); a second registration is ignored."""
    if check not in CHECKS:
        CHECKS.append(check)
    return check


def job_shape() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment; no process group is needed."""
    def env_int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name) or default)
        except ValueError:
            return default

    rank = env_int("RANK", 0)
    return rank, env_int("LOCAL_RANK", rank), env_int("WORLD_SIZE", 1)


def reports(rank: int, local_rank: int) -> bool:
    """Whether this process prints preflight's message: rank 0, and the first rank of every other node
    (so a path missing on one node only is not hidden; one node prints once)."""
    return rank == 0 or local_rank == 0


def preflight_run(cfg: Any, problems: Iterable[Problem] = (), world_size: int | None = None,
                  rank: int | None = None) -> RunContext:
    """Run every :data:`CHECKS` entry on ``cfg``; raise :class:`PreflightError` with all problems found.

    Args:
        cfg: the resolved :class:`~dmdr.config.TrainConfig`.
        problems: problems found earlier (command-line values that did not convert), reported with these.
        world_size, rank: the job's shape; default from ``WORLD_SIZE`` / ``RANK``.

    Returns:
        The context, whose ``facts`` the dry-run plan prints.
    """
    env_rank, _, env_world = job_shape()
    ctx = RunContext(cfg, world_size=env_world if world_size is None else world_size,
                     rank=env_rank if rank is None else rank)
    found = list(problems)
    for check in CHECKS:
        try:
            found += check(ctx)
        except UserError as err:  # a check's own one-line error still joins the others
            found.append(Problem("", fix=str(err)))
    raise_problems(found)
    return ctx


__all__ = ["Problem", "PreflightError", "RunContext", "CHECKS", "register_check", "preflight_run",
           "raise_problems", "problem_from", "format_problems", "job_shape", "reports"]
