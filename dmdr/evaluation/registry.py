"""The metric registry: a metric is a name, a check of its local checkpoint, and a scorer it loads.

A metric never downloads anything. :attr:`Metric.check` looks at the options (the tool's
``--clip-model``, ``--hps-checkpoint``, ... flags and ``--metric-option key=value``, one flat mapping)
without loading a model and returns ``None`` when the metric can run or a one-line note saying why it
is skipped (no checkpoint given, a path that does not exist, a package that is not installed).
:attr:`Metric.load` then builds the scorer; a checkpoint that exists but is not what the metric needs
(another architecture, a garbled file) raises a one-line :class:`~dmdr.errors.UserError` instead.

A scorer is ``scorer(images, prompts) -> Tensor``: ``images`` ``(B, 3, H, W)`` RGB in ``[0, 1]``,
``prompts`` the ``B`` prompts they were sampled from. Per-image metrics (``per="image"``) return one
score per image, shape ``(B,)``. Per-prompt metrics (``per="prompt"``, e.g. diversity) are called with
the images of every seed of ONE prompt and return one score, shape ``(1,)``.

Adding a metric is one call, in any module imported before the evaluation runs (one of this package's,
imported by its ``__init__``, or any module ``tools/eval.py --plugin MODULE`` imports)::

    register_metric(Metric("shapeeval", load=load, check=lambda options: None, default=False))

(:mod:`dmdr.evaluation.shapes`, the shapes world's ShapeEval, is exactly that.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dmdr.errors import ConfigError

Scorer = Callable[[Tensor, list[str]], Tensor]
Options = Mapping[str, str]


@dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    Attributes:
        name: the ``--metrics`` name and the column of the report.
        load: ``load(options, device) -> scorer`` (see the module doc); raises a one-line ``UserError``.
        check: ``check(options) -> None | note``: ``None`` if ``load`` can run, else the one-line skip note.
        per: ``"image"`` (a score per image) or ``"prompt"`` (a score per prompt, over its seeds).
        min_seeds: the fewest seeds per prompt it needs (diversity: 2); skipped with a note below that.
        default: run when ``--metrics`` is not given (``False``: only when named, e.g. world-specific metrics).
        higher_is_better: how the report reads the column.
    """

    name: str
    load: Callable[[Options, torch.device], Scorer]
    check: Callable[[Options], str | None]
    per: Literal["image", "prompt"] = "image"
    min_seeds: int = 1
    default: bool = True
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {}
"""Registered metrics by name, in registration order (the report's column order)."""


def register_metric(metric: Metric) -> Metric:
    """Add (or replace) ``metric`` in :data:`METRICS`; returns it."""
    if metric.per not in ("image", "prompt"):
        raise ValueError(f"metric {metric.name!r}: per must be 'image' or 'prompt', got {metric.per!r}")
    METRICS[metric.name] = metric
    return metric


def select_metrics(names: list[str] | None) -> list[Metric]:
    """The metrics called ``names`` (the :attr:`Metric.default` ones when ``None``); an unknown name is one line."""
    if not names:
        return [m for m in METRICS.values() if m.default]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"--metrics: unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    return [METRICS[n] for n in dict.fromkeys(names)]


def need_path(options: Options, key: str, what: str, kind: Literal["file", "dir", "any"] = "any") -> str | None:
    """The skip note for a missing option ``key`` (``--key-with-dashes``), or ``None`` when its path exists."""
    flag = "--" + key.replace("_", "-")
    value = options.get(key, "")
    if not value:
        return f"no {flag} given ({what})"
    path = Path(value).expanduser()
    if not path.exists():
        return f"{flag} {path} does not exist ({what})"
    if kind == "file" and not path.is_file():
        return f"{flag} {path} is not a file ({what})"
    if kind == "dir" and not path.is_dir():
        return f"{flag} {path} is not a folder ({what})"
    return None


def need_module(module: str, install: str) -> str | None:
    """The skip note when ``module`` cannot be imported (``install`` says how to get it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"the {module} package is not installed ({install})"
    return None


__all__ = ["Metric", "METRICS", "Scorer", "Options", "register_metric", "select_metrics", "need_path",
           "need_module"]
