"""The command-line tools, as code: each module has ``main(argv=None) -> int`` (the process exit code).

Run them as ``python tools/<name>.py`` (thin launchers at the paths users know) or as the installed
``dmdr-<name>`` commands (``[project.scripts]`` in pyproject.toml). Bad input prints one ``error:`` line and
exits 2 (:func:`~dmdr.errors.error_exit`, with which the recipe launcher :mod:`dmdr.launch` also prints its exits
3 and 4); :func:`run_tool` is the whole ``main`` of a tool.

``tools/profile.py`` bears the name of the standard library's ``profile``, which ``cProfile`` imports (torch
does, through ``torch.distributed.checkpoint`` and ``torch._dynamo``). A tool run by path has ``tools/`` first
on ``sys.path``, so that import finds the launcher: imported under that name, the launcher calls
:func:`become_stdlib_module` and the process gets the real module.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import sysconfig
from collections.abc import Callable

from dmdr.errors import UserError, error_exit
from dmdr.logs import setup_logging


def start(parse: Callable[[list[str]], argparse.Namespace], argv: list[str] | None) -> argparse.Namespace:
    """A tool's start: dmdr's console logging (:func:`dmdr.logs.setup_logging`), then ``parse(argv)`` (the
    command line when ``argv`` is None)."""
    setup_logging()
    return parse(sys.argv[1:] if argv is None else argv)


def run_tool(parse: Callable[[list[str]], argparse.Namespace], work: Callable[[argparse.Namespace], str | int],
             argv: list[str] | None) -> int:
    """A tool's ``main``: :func:`start`, then ``work(args)``, which returns the line printed on success (exit 0)
    or, for a tool that prints its own report, its exit code; bad input is its one ``error:`` line and exit
    code 2 (:func:`error_exit`), printed unless another rank of the job prints it (``reported_elsewhere``)."""
    args = start(parse, argv)
    try:
        done = work(args)
    except UserError as e:
        return error_exit(e, show=not e.reported_elsewhere)
    if isinstance(done, int):
        return done
    print(done)
    return 0


def become_stdlib_module(name: str) -> None:
    """Make ``sys.modules[name]`` the standard library's module ``name``.

    For a file that is being imported under a standard module's name by mistake (see the module doc): the
    import system returns what ``sys.modules`` holds once that file has run.
    """
    spec = importlib.machinery.PathFinder.find_spec(name, [sysconfig.get_path("stdlib")])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no standard library module {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

