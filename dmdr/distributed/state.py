"""``Stateful`` adapters for the checkpoint tree: model + optimizers, per-rank RNGs, per-rank data position.

Two kinds of entries go into one checkpoint (see :class:`~dmdr.distributed.checkpoint.CheckpointManager`):

* **global** entries (models, optimizers, step counters): tensors may be FSDP2-sharded DTensors and
  are resharded by torch.distributed.checkpoint when the world size changes; plain values must be
  the same on every rank (rank 0's copy is written).
* **per-rank** entries (:class:`RankLocal`: RNG states, data-loader positions): every rank writes its
  own blob under ``<name>.rank<r>``. They are restored only at the same world size; at another
  world size an entry with ``load_resharded_state`` gets all the old ranks' states, any other keeps
  its fresh state (documented in :mod:`dmdr.distributed.checkpoint`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


class ModelOptimizerState:
    """A model and its optimizers as one ``Stateful`` (FSDP2-sharded or plain modules alike).

    ``get_state_dict`` seeds empty optimizer state with a zero-gradient, ``lr = 0`` step so that a fresh
    optimizer has ``exp_avg`` / ``exp_avg_sq`` / ``step`` tensors for the checkpoint to load into;
    call :meth:`state_dict` (the checkpoint manager does) only while gradients are ``None``.

    Args:
        model: the module (the FSDP root when sharded).
        optimizers: zero or more optimizers over disjoint subsets of ``model``'s parameters (e.g. the
            generator-LoRA and critic-LoRA optimizers when both adapters live in the teacher's network).
        trainable_only: save and load only parameters with ``requires_grad`` (LoRA on a frozen base:
            the base is reloaded from the pretrained weights, not checkpointed).
    """

    def __init__(self, model: nn.Module,
                 optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (), *,
                 trainable_only: bool = False):
        self.model = model
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.trainable_only = trainable_only

    def _options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self._options())}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self._options())
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.optimizers:
            set_model_state_dict(self.model, state["model"], options=self._options())
            return
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._options())


class RankLocal:
    """Marker base: a ``Stateful`` whose state differs across ranks (stored once per rank).

    Subclasses may define ``load_resharded_state(states: list[Any]) -> None`` to take over the old
    ranks' states (index = old rank) when a checkpoint is loaded at another world size.
    """

    def state_dict(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class RNGState(RankLocal):
    """Per-rank random state: named ``torch.Generator`` s plus (optionally) the global RNGs.

    Args:
        generators: e.g. ``{"noise": trainer.rng}``; restored in place.
        include_global: also torch's default CPU (and current CUDA) generator and Python's ``random``.
    """

    def __init__(self, generators: dict[str, torch.Generator] | None = None, include_global: bool = True):
        self.generators = dict(generators or {})
        self.include_global = include_global

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"gen/{k}": g.get_state() for k, g in self.generators.items()}
        if self.include_global:
            state["torch"] = torch.get_rng_state()
            state["python"] = random.getstate()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, g in self.generators.items():
            g.set_state(state[f"gen/{k}"])
        if self.include_global:
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])


class PerRank(RankLocal):
    """Any ``Stateful`` whose state is this rank's own (a data loader, a per-rank skip monitor, ...).

    If the wrapped object has ``load_resharded_state(states)``, it is used on a world-size change;
    otherwise the object keeps its fresh state then (see :mod:`dmdr.distributed.checkpoint`).
    """

    def __init__(self, obj: Any, optional: bool = False):
        self.obj = obj
        self.optional = optional
        """The entry may be missing from a checkpoint (one written before the run added it, e.g. a cold start
        resumed with another ``rl.method``): the object then keeps its fresh state."""
        if hasattr(obj, "load_resharded_state"):
            self.load_resharded_state = obj.load_resharded_state

    def state_dict(self) -> Any:
        return self.obj.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.obj.load_state_dict(state)


class DataLoaderState(PerRank):
    """The position of this data-parallel rank's loader (e.g. torchdata's ``StatefulDataLoader``)."""
