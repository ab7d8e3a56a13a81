"""torchrun with preemption that reaches the workers: ``python -m dmdr.launcher <torchrun options> recipe.py ...``.

Plain torchrun gets preemption wrong for a trainer that checkpoints on a signal:

* SIGUSR1 (SLURM's ``--signal=USR1@<seconds>`` warning) kills torchrun at once (it has no handler), and
  the workers, in sessions of their own, train on unsignalled until the job's hard kill;
* SIGTERM / SIGINT make torchrun stop the workers with a 30-second grace, then exit 1 with a traceback;
* a worker's one-line error (exit 2, :class:`~dmdr.errors.UserError`) is followed by torchrun's
  ~40-line ``ChildFailedError`` traceback and exit 1.

This module runs torchrun's own agent in this process (every torchrun option works the same) and
instead *forwards* SIGTERM, SIGUSR1 and SIGINT to its workers: each worker's
:class:`~dmdr.distributed.faults.PreemptionHandler` finishes the step, all ranks checkpoint together
and exit 0, so the agent (and this process) exits 0. A second SIGTERM / SIGINT more than
:data:`~dmdr.distributed.faults.REPEAT_GRACE_S` seconds later is the user insisting: torchrun's own
shutdown runs. When the first failed worker exited with a dmdr user-facing code (2: bad input, 3:
diverged, 4: stopped by the guard) its one line is the whole report and this process exits with the same code.

SIGTERM / SIGINT forwarding needs a torchrun with ``--signals-to-handle`` (recent torch, 2.14 tested): an older
one installs its own handlers for them when the workers start (SIGUSR1 is forwarded by any version).

SLURM: ``#SBATCH --signal=B:USR1@300`` signals only the batch shell, which forwards it to ``srun``
(which forwards it to its tasks, these launchers); see the README's script.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import FrameType

import psutil

from dmdr.distributed.faults import REPEAT_GRACE_S

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
USER_EXIT_CODES = (2, 3, 4)
"""Exit codes of a dmdr worker that already printed its one-line reason (launch.py: bad input, diverged, stopped
by the guard)."""

log = logging.getLogger("dmdr")


def worker_pids() -> list[int]:
    """This process's torchrun workers (its children with a ``LOCAL_RANK`` in their environment)."""
    found = []
    for child in psutil.Process().children(recursive=False):
        try:
            if "LOCAL_RANK" in child.environ():
                found.append(child.pid)
        except psutil.AccessDenied:
            found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


class SignalForwarder:
    """Forwards preemption signals to the workers, once; a later repeat hands over to torchrun's shutdown."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        now = time.monotonic()
        self.received.append(signum)
        insisting = self.first_at is not None and now - self.first_at > REPEAT_GRACE_S
        pids = worker_pids()
        if (insisting and signum != signal.SIGUSR1) or (not pids and signum != signal.SIGUSR1):
            # No worker to checkpoint yet (rendezvous), or the user insists: torchrun's own shutdown.
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
        if self.first_at is None:
            self.first_at = now
            print(f"dmdr.launcher: {signal.Signals(signum).name}: forwarding it to {len(pids)} worker(s), which "
                  "finish the step, checkpoint and exit", file=sys.stderr, flush=True)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


class _QuietUserFailures(logging.Filter):
    """Drops torchrun's log line about a worker that exited with a user-facing code (it printed its reason),
    and its "Sending process N closing signal" lines (logged before it knows why a worker failed; a crash's
    own traceback and torchrun's failure report say more)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("closing signal" in msg or any(f"(exitcode: {code})" in msg for code in USER_EXIT_CODES))


def main(argv: list[str] | None = None) -> int:
    """Run torchrun's agent with ``argv`` (torchrun's own options and script); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # torchrun must not install its own handlers for the forwarded signals (they would replace ours).
    kept = [s for s in getattr(args, "signals_to_handle", "SIGHUP,SIGQUIT").split(",")
            if s.strip() and s.strip() not in {sig.name for sig in FORWARDED}]
    args.signals_to_handle = ",".join(kept) or "SIGHUP"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = args.signals_to_handle
    forwarder = SignalForwarder()
    for sig in FORWARDED:
        signal.signal(sig, forwarder)
    quiet = _QuietUserFailures()
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.errors"):
        logging.getLogger(name).addFilter(quiet)
    try:
        run(args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in USER_EXIT_CODES:
            return first.exitcode  # the worker printed the one line; no traceback after it
        raise
    except SignalException as err:
        print(f"dmdr.launcher: stopped by {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
