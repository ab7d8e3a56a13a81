"""ShapeEval (the shapes world's exact checker, :mod:`dmdr.worlds.shapes.shapeeval`) as an evaluation metric.

Per image ``1.0`` when it passes every check of its prompt (colour, shape, count, position), else
``0.0``, so the report's mean is ShapeEval's ``exact`` accuracy (the demo's ``overall`` is the mean of
the four attribute accuracies, GenEval's convention; see :func:`dmdr.worlds.shapes.shapeeval.summarize`).
Needs no checkpoint, but only shapes-world prompts make sense to it: it is not among the default
metrics, ask for it with ``--metrics shapeeval ...``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr.errors import DataError
from dmdr.evaluation.registry import Metric, Options, Scorer, register_metric
from dmdr.worlds.shapes.shapeeval import evaluate


def load(options: Options, device: torch.device) -> Scorer:
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        try:
            rows = evaluate(images.detach().float().cpu(), list(prompts))
        except ValueError as e:  # a prompt the shapes world cannot parse
            raise DataError(f"shapeeval: {e} (use the shapes world's prompts, or leave shapeeval out of "
                            "--metrics)") from None
        return torch.tensor([float(bool(r["exact"])) for r in rows])

    return score


SHAPEEVAL = register_metric(Metric("shapeeval", load=load, check=lambda options: None, default=False))
