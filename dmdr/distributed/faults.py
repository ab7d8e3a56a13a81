"""Faults: preemption signals and non-finite steps, decided the same way on every rank.

Preemption: SIGTERM (SLURM / Kubernetes eviction, torchrun shutting its workers down), SIGUSR1
(SLURM's ``--signal=USR1@<seconds>`` warning) or SIGINT (Ctrl-C) only sets a flag; the trainer asks
:meth:`PreemptionHandler.should_stop` after each step, and when any rank was signalled every rank
finishes the step, checkpoints and exits 0. Under torchrun the workers get these signals through
:mod:`dmdr.launcher`, which forwards them (torchrun alone would kill the workers or itself).
A second signal more than :data:`REPEAT_GRACE_S` seconds after the first restores the previous handler
and re-delivers the signal (a user who insists gets the default behaviour); one sooner is the same
request arriving twice (SLURM signals every process of a step, the launcher forwards it again) and is
ignored.

Non-finite steps: :func:`all_finite` is false on every rank when the loss or any gradient is
non-finite on any rank, so all ranks skip the optimizer step together (optimizer states stay identical).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from dmdr.distributed.env import DistEnv

log = logging.getLogger("dmdr")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_GRACE_S = 10.0
"""A repeated signal within this many seconds of the first is a duplicate delivery, not a user insisting."""


class PreemptionHandler:
    """Turns preemption signals into a flag that all ranks agree on.

    Use as a context manager (or :meth:`install` / :meth:`uninstall`) in the main thread::

        with PreemptionHandler(env) as preempt:
            trainer.train(logger, checkpoint=..., should_stop=preempt.should_stop)
    """

    def __init__(self, env: DistEnv | None = None, signals: Iterable[int] = PREEMPTION_SIGNALS):
        self.env = env or DistEnv()
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._previous: dict[int, object] = {}
        self.received: int | None = None
        self._first_at = 0.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._flag.is_set():
            if time.monotonic() - self._first_at < REPEAT_GRACE_S:
                return  # the same preemption delivered twice (to this process and forwarded by the launcher)
            # a second signal later on: give it its default meaning
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # type: ignore[arg-type]
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self._first_at = time.monotonic()
        self._flag.set()
        log.warning("received %s: finishing the current step, checkpointing and exiting",
                    signal.Signals(signum).name)

    def install(self) -> PreemptionHandler:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """Whether this rank was signalled (local, no communication)."""
        return self._flag.is_set()

    def request(self) -> None:
        """Ask for a stop as a signal would (e.g. from a watchdog)."""
        self._flag.set()

    def should_stop(self) -> bool:
        """True on every rank once any rank was signalled (one all-reduce; call it on all ranks)."""
        return self.env.any_rank(self._flag.is_set())


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def all_finite(loss: Tensor | None, params: Iterable[torch.nn.Parameter] = (),
               env: DistEnv | None = None) -> bool:
    """Whether ``loss`` and every gradient of ``params`` are finite, on all ranks (agreed).

    Each rank checks its local gradient shards; one all-reduce makes the answer global.
    """
    checks = [] if loss is None else [torch.isfinite(loss.detach()).all()]
    checks += [torch.isfinite(_local(p.grad)).all() for p in params if p.grad is not None]
    ok = bool(torch.stack(checks).all().item()) if checks else True
    return not (env or DistEnv()).any_rank(not ok)
