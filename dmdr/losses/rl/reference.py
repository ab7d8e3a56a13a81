"""The frozen reference policy of DPO: the generator's trainable weights as they were at the RL start.

The snapshot holds a copy of the generator's *trainable* parameters only: with a LoRA generator that is
its adapter (cheap: the base is shared and frozen anyway); with a full generator it is one more copy of
the model (ALGORITHM.md, DPO). Under FSDP2 the copies are DTensors sharded like the parameters (one
shard per rank), saved in the checkpoint like the EMA.

The reference is evaluated by swapping the snapshot into the parameters in place (no grad), calling
the generator, and swapping back: no second module, nothing re-wrapped, and the same call path
(FSDP2 all-gathers, LoRA scales, activation checkpointing) as the generator's. The swap must finish
before the step's backward (activation checkpointing recomputes with the weights present then): a
reference call is a no-grad forward that returns before any backward, so it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class FrozenReference:
    """A snapshot of ``params`` (taken by :meth:`take`) and a way to run the model at it.

    Args:
        params: the generator's trainable parameters (possibly DTensors).
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.values = [p.detach().clone() for p in params]
        self.taken = False

    @torch.no_grad()
    def take(self) -> None:
        """Copy the current weights into the snapshot (at the RL start)."""
        for v, p in zip(self.values, self.params):
            v.copy_(p.detach())
        self.taken = True

    def wrap(self, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``fn`` evaluated at the snapshot's weights, without grad."""

        def reference_fn(*args: Any, **kwargs: Any) -> Tensor:
            if not self.taken:
                raise RuntimeError("the reference snapshot was never taken (call take() at the RL start)")
            # Through ``.data``: the step's graph (the DMD forward) has saved these parameters for its
            # backward; a swap through ``.data`` leaves their autograd version untouched, and the values
            # are restored bit for bit before that backward runs.
            with torch.no_grad():
                current = [p.data.clone() for p in self.params]
                try:
                    for p, v in zip(self.params, self.values):
                        p.data.copy_(v)
                    return fn(*args, **kwargs)
                finally:
                    for p, c in zip(self.params, current):
                        p.data.copy_(c)

        return reference_fn
