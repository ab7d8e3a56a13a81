"""Evaluation: the paper's metrics for any model (an export, a base teacher, a training checkpoint).

``tools/eval.py`` is the command line; this package is the library it calls:

* :mod:`~dmdr.evaluation.registry`: :class:`Metric` (name, ``check`` -> one-line skip note, ``load`` ->
  scorer of per-image or per-prompt scores) and :func:`register_metric`;
* the built-in metrics, one module each, every one from a local checkpoint: ``clip``
  (:mod:`~dmdr.evaluation.clip_score`, ``100 max(cos, 0)``), ``aesthetic`` (LAION's MLP head,
  :mod:`~dmdr.evaluation.aesthetic`), ``pickscore``, ``hps`` (HPSv2.1), ``diversity`` (mean pairwise LPIPS
  over a prompt's seeds, :mod:`~dmdr.evaluation.diversity`) and, when asked for, ``shapeeval`` (the shapes
  world's exact checker, :mod:`~dmdr.evaluation.shapes`);
* :mod:`~dmdr.evaluation.samplers` (which model a path is, fixed per-image noise),
  :mod:`~dmdr.evaluation.runner` (sample, score, split prompts across ranks and gather),
  :mod:`~dmdr.evaluation.stats` (mean, std, 95% bootstrap interval), :mod:`~dmdr.evaluation.report`.
"""

from __future__ import annotations

from dmdr.evaluation import aesthetic, clip_score, diversity, hps, pickscore, shapes  # noqa: F401 - registers them
from dmdr.evaluation.registry import METRICS, Metric, register_metric, select_metrics

__all__ = ["METRICS", "Metric", "register_metric", "select_metrics"]
