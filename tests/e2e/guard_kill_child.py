"""A guard run that SIGKILLs itself at one point of its first rollback (for tests/e2e/test_guard_actions.py).

    python -m tests.e2e.guard_kill_child ASSETS_JSON OUTPUT_DIR POINT THREADS

POINT: ``tripped`` (the trip logged, nothing rolled back), ``discarded`` (the later checkpoints deleted),
``loaded`` (the target checkpoint loaded, the lowered setting not yet saved), ``swapped`` (re-saving the target:
its old copy moved aside, the new one not yet in place), ``after`` (the rollback done and saved). Exits 3 if the
point was never reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(assets: str, out: str, point: str, threads: str) -> int:
    import pytest
    import torch

    import dmdr.distributed.checkpoint as checkpoint_module
    from dmdr.distributed.checkpoint import CheckpointManager
    from dmdr.guard import Guard
    from dmdr.launch import run
    from tests.e2e.guard_helpers import guard_config, install_trip_once

    torch.set_num_threads(int(threads))  # the parent's: the uninterrupted run's arithmetic, bit for bit
    mp = pytest.MonkeyPatch()
    install_trip_once(mp)

    def die_before(original):
        def wrapped(*args, **kwargs):
            _die()
        return wrapped

    def die_after(original):
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            _die()
            return result
        return wrapped

    if point == "tripped":
        mp.setattr(Guard, "rollback", die_before(Guard.rollback))
    elif point == "discarded":
        mp.setattr(CheckpointManager, "discard_after", die_after(CheckpointManager.discard_after))
    elif point == "loaded":
        mp.setattr(CheckpointManager, "load", die_after(CheckpointManager.load))
    elif point == "swapped":
        replace = os.replace

        def swap_then_die(src, dst):
            replace(src, dst)
            if Path(dst).name.startswith(checkpoint_module.REPLACED):
                _die()

        mp.setattr(checkpoint_module.os, "replace", swap_then_die)
    elif point == "after":
        mp.setattr(Guard, "rollback", die_after(Guard.rollback))
    else:
        raise SystemExit(f"unknown point {point}")
    run(guard_config(json.loads(assets), Path(out)))
    return 3


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
