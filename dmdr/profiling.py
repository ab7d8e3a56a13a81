"""``--profile.*``: a torch profiler trace (and on CUDA an allocator snapshot) of generator steps N..M.

The trainer calls :meth:`StepProfiler.iteration` around every iteration. The profiler starts before the first
iteration of generator step ``start_step`` and stops after the one that completes ``end_step``; each iteration is
a ``record_function`` range named ``dmdr/step <k>`` (``k``: the generator step it belongs to), so the trace shows
where every step went. Per rank it writes ``<folder>/rank<R>.steps<N>-<M>.pt.trace.json`` (Chrome trace JSON:
Perfetto, chrome://tracing, and TensorBoard with the torch-tb-profiler plugin) and, on CUDA with
``profile.memory_snapshot``, ``rank<R>.memory.pickle`` (https://pytorch.org/memory_viz). Off by default: tracing
costs time and the traces are large.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STEP_RANGE = "dmdr/step"
"""The ``record_function`` name prefix of one iteration, followed by its generator step."""


def profile_folder(cfg: Any) -> Path:
    """``profile.folder``, relative to ``train.output_dir`` unless absolute."""
    folder = Path(cfg.profile.folder)
    return folder if folder.is_absolute() else Path(cfg.train.output_dir) / folder


class StepProfiler:
    """The profiler window of one rank (a no-op when ``profile.enabled`` is false).

    Args:
        cfg: the resolved config (``profile`` and ``train.output_dir`` are read).
        rank: this process's rank (names the files).
        device: the training device (CUDA adds the CUDA activity and the memory snapshot).
    """

    def __init__(self, cfg: Any, rank: int, device: torch.device):
        p = cfg.profile
        self.enabled = bool(p.enabled)
        self.start, self.end = p.start_step, p.end_step
        self.rank, self.device = rank, device
        self.folder = profile_folder(cfg)
        self.record_shapes, self.with_stack, self.snapshot = p.record_shapes, p.with_stack, p.memory_snapshot
        self._prof: torch.profiler.profile | None = None
        self.done = False
        self.trace_path: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    @contextmanager
    def iteration(self, step: int, step_after: Any) -> Iterator[None]:
        """Around one iteration at generator step ``step``; ``step_after()`` reads the step once it has run."""
        if not self.enabled or self.done or step < self.start:
            yield
            return
        if step > self.end:  # resumed past the window: nothing to trace
            self.done = True
            yield
            return
        if self._prof is None:
            self._begin()
        with torch.profiler.record_function(f"{STEP_RANGE} {step}"):
            yield
        if step_after() > self.end:
            self._finish()

    def _begin(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.snapshot:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=self.record_shapes,
                                            with_stack=self.with_stack, profile_memory=self.cuda)
        self._prof.__enter__()
        log.info("profiling generator steps %d..%d (profile.folder %s)", self.start, self.end, self.folder)

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        self.done = True
        if prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.folder / f"rank{self.rank}.steps{self.start}-{self.end}.pt.trace.json"
        prof.export_chrome_trace(str(self.trace_path))
        written = [self.trace_path]
        if self.cuda and self.snapshot:
            snap = self.folder / f"rank{self.rank}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snap)
        log.info("profile written: %s", ", ".join(str(p) for p in written))

    def close(self) -> None:
        """End an open window (the run stopped inside it): what was traced is still written."""
        if self._prof is not None:
            self._finish()
