"""Gradient accumulation's pieces (``--train.grad_accum K``): slices, chunked no-grad calls, merged metrics.

The step engine (:mod:`dmdr.engine`) draws a step's randomness for the whole per-rank batch, in the order a
one-batch step draws it, and then runs every forward *with grad* on ``K`` slices of it, one backward each, each
loss weighted by its share of the batch. Every loss of the step is a mean over samples (or DPO pairs, GRPO
trajectories, which stay whole in a slice), so the summed gradients are the whole batch's: the update equals the
one-batch update up to float summation order (tests/algorithm/test_grad_accum.py: fp64 to 1e-10, fp32 to 1e-5).
Forwards without grad on the whole batch (backward simulation, DPO's candidates, GRPO's group) run in ``K``
chunks too (:func:`chunked`), so a step's activation peak is one slice's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def micro_slices(n: int, k: int) -> list[slice]:
    """``k`` contiguous slices covering ``range(n)``, sizes as equal as possible (equal when ``k`` divides ``n``)."""
    k = max(1, min(k, n)) if n else 1
    bounds = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def rows(value: Any, s: slice, n: int) -> Any:
    """``value[s]`` for batch-first tensors of ``n`` rows and dicts of them (conditioning); anything else as is
    (a float LoRA scale, a 0-d level)."""
    if isinstance(value, Tensor):
        return value[s] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {key: rows(v, s, n) for key, v in value.items()}
    return value


def chunked(fn: Callable[..., Tensor], k: int) -> Callable[..., Tensor]:
    """``fn(x, *args)`` run on ``k`` row slices of ``x`` (and of the batch-first args) when no grad is recorded,
    the outputs concatenated: the same values at 1/k of the activation memory. With grad (or ``k == 1``) the call
    is passed through: chunks of one autograd graph would free nothing."""
    if k <= 1:
        return fn

    def call(x: Tensor, *args: Any) -> Tensor:
        if torch.is_grad_enabled() or x.shape[0] < 2:
            return fn(x, *args)
        n = x.shape[0]
        return torch.cat([fn(x[s], *(rows(a, s, n) for a in args)) for s in micro_slices(n, k)])

    return call


def merge_stats(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Metrics of the whole batch from per-slice ``(share, metrics)`` (shares sum to 1).

    Every metric the slices report is a mean over their samples, so the batch's is the share-weighted mean;
    a ``<name>_std`` beside ``<name>`` is a population std, pooled exactly: ``var = sum share (std^2 + mean^2)
    - mean_all^2``.
    """
    if len(parts) == 1:
        return dict(parts[0][1])
    keys = [key for key in parts[0][1]]
    out: dict[str, float] = {}
    for key in keys:
        if all(key in m for _, m in parts):
            out[key] = sum(share * m[key] for share, m in parts)
    for key in keys:
        base = key[:-len("_std")] if key.endswith("_std") else None
        if base is None or base not in out or key not in out:
            continue
        second = sum(share * (m[key] ** 2 + m[base] ** 2) for share, m in parts)
        out[key] = max(second - out[base] ** 2, 0.0) ** 0.5
    return out
