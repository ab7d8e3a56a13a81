"""Copies of the generator's trainable weights kept beside the run: the EMA and the RL reference.

Both hold one tensor per trainable parameter of the generator (a LoRA generator: its adapter; a full one: the
whole model); under FSDP2 they are DTensors sharded like the parameters (one shard per rank), and the trainer
checkpoints them keyed by the parameters' names (:meth:`dmdr.engine.Roles.generator_param_names`).

:class:`EMA`: the exponential moving average ``e <- decay e + (1 - decay) p`` after every *applied* generator
step (a skipped, non-finite step moves neither the weights nor the average); what ``--weights ema`` exports.

:class:`FrozenReference`: the generator as it was at the RL start, the reference policy of DPO and of GRPO's
KL term (ALGORITHM.md, DPO). It is evaluated by swapping the snapshot into the parameters in place (no grad),
calling the generator, and swapping back: no second module, nothing re-wrapped, and the same call path
(FSDP2 all-gathers, LoRA scales, activation checkpointing) as the generator's. The swap must finish before
the step's backward (activation checkpointing recomputes with the weights present then): a reference call is
a no-grad forward that returns before any backward, so it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class EMA:
    """The exponential moving average of ``params``, a ``Stateful`` keyed by ``names()``.

    Args:
        params: the generator's trainable parameters (possibly DTensors).
        decay: ``optim.ema_decay`` in (0, 1).
        names: the parameters' names, in order (called when the state is saved or loaded: the names do not
            depend on how the network is wrapped, the order of ``params`` does not change).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, names: Callable[[], list[str]]):
        self.params = params
        self.decay = decay
        self.names = names
        self.values = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an applied optimizer step."""
        for e, p in zip(self.values, self.params):
            e.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def restart_from_weights(self) -> None:
        """Start the average again from the current weights (a resume whose checkpoint holds no EMA)."""
        for e, p in zip(self.values, self.params):
            e.copy_(p.detach())

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names(), self.values))

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, t in zip(self.names(), self.values):
            t.copy_(state[name])


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
