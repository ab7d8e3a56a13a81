"""Metrics to ``metrics.jsonl`` and TensorBoard, image grids, throughput, memory, FLOPs and MFU, a progress bar.

Only the main rank writes; every rank may call (calls on other ranks are no-ops), so the
trainer needs no ``if rank == 0`` around logging. Metrics are averaged (or summed) over the ranks by
:func:`reduce_over_ranks`, which every rank must call with the same keys.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from dmdr.gpus import match_cuda_name


class MetricsLogger:
    """Appends one JSON object per logged step to ``<output_dir>/metrics.jsonl`` and mirrors to TensorBoard.

    On resume the file is first truncated to the records with ``step <= resume_step``, so a run that
    died after logging but before checkpointing never leaves duplicate or stale records behind. A fresh
    start over an existing file moves it aside (:func:`dmdr.run_folder.archive_metrics`), never deletes it.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            from dmdr.run_folder import archive_metrics

            archive_metrics(self.path.parent)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
        self.path.write_text("".join(k + "\n" for k in kept))

    def set_aside_after(self, step: int, name: str) -> Path | None:
        """Move the records with ``step`` > ``step`` into ``name`` (a rolled-back branch: kept, not mixed in)."""
        if not self.enabled or not self.path.exists():
            return None
        kept, aside = [], []
        for line in self.path.read_text().splitlines():
            try:
                (kept if json.loads(line).get("step", 0) <= step else aside).append(line)
            except json.JSONDecodeError:
                continue
        dest = self.path.with_name(name)
        dest.write_text("".join(a + "\n" for a in aside))
        self.path.write_text("".join(k + "\n" for k in kept))
        return dest

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for k, v in sorted(metrics.items()):
            v = float(v)
            record[k] = v if math.isfinite(v) else None
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A markdown text summary in TensorBoard's Text tab (no-op without TensorBoard)."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def log_images(self, step: int, tag: str, images: Tensor, nrow: int = 4) -> Path | None:
        """Log a grid of ``(B, 3, H, W)`` images in [0, 1]; also saved as ``samples/<tag>-<step>.png``."""
        if not self.enabled:
            return None
        from torchvision.utils import make_grid, save_image

        grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow)
        out = self.path.parent / "samples" / f"{tag}-{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        if self._tb is not None:
            self._tb.add_image(tag, grid, step)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Throughput:
    """Wall time per generator step and samples per second since the last report."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._steps = 0
        self._samples = 0

    def update(self, steps: int, samples: int) -> None:
        self._steps += steps
        self._samples += samples

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        out = {"perf/step_time": dt / max(self._steps, 1), "perf/samples_per_s": self._samples / dt}
        self._t0, self._steps, self._samples = now, 0, 0
        return out


class FlopCount:
    """Accumulates the FLOPs of the code run inside ``with`` blocks (torch's flop counter)."""

    def __init__(self) -> None:
        self.total = 0
        self._mode: FlopCounterMode | None = None

    def __enter__(self) -> FlopCount:
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self.total += self._mode.get_total_flops()


class StepPerf:
    """Throughput, peak memory and, on a GPU of known peak, achieved TFLOP/s and MFU of generator steps.

    The FLOPs of one generator step (all its iterations) are counted once per stage (cold start, RL: their steps
    differ), on the stage's first step, with torch's flop counter, which slows the step it counts.

    Args:
        device: where the steps run (memory, and the GPU whose peak makes MFU).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_tflops = gpu_peak_tflops(device)
        self.throughput = Throughput()
        self._flops = FlopCount() if self.peak_tflops else None
        self._counted_stage: Any = None
        self._tflops_per_step: float | None = None

    def measure(self, stage: Any) -> AbstractContextManager:
        """Wrap one iteration of ``stage``: counts its FLOPs until that stage's first generator step is counted."""
        if self._flops is None or self._counted_stage == stage:
            return nullcontext()
        return self._flops

    def generator_step(self, stage: Any, samples: int, counted: bool) -> None:
        """A generator step of ``stage`` ended after ``samples`` samples (all ranks); ``counted``: measured by
        :meth:`measure` (its iterations' FLOPs now make the stage's FLOPs per generator step)."""
        self.throughput.update(1, samples)
        if counted and self._flops is not None:
            self._counted_stage = stage
            self._tflops_per_step = self._flops.total / 1e12
            self._flops.total = 0

    def report(self) -> dict[str, float]:
        """Step time, samples/s, peak memory; TFLOP/s and MFU once a step was counted (since the last report)."""
        out = self.throughput.report()
        out["perf/peak_memory_gb"] = peak_memory_gb(self.device)
        if self.peak_tflops and self._tflops_per_step is not None:
            achieved = self._tflops_per_step / out["perf/step_time"]
            out["perf/tflops"] = achieved
            out["perf/mfu"] = achieved / self.peak_tflops
        return out


def reduce_over_ranks(metrics: dict[str, float], dist: Any, op: str = "mean") -> dict[str, float]:
    """Mean (losses, rewards, norms) or sum (counters) of every metric over the ranks of ``dist`` (None: as is)."""
    if dist is None or not dist.is_distributed or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.world_size
    return dict(zip(keys, t.tolist()))


def data_metrics(monitor: Any, dist: Any, reasons: tuple[str, ...]) -> dict[str, float]:
    """Bad-data counters of a :class:`dmdr.data.SkipMonitor` summed over ranks, on a fixed key set (every rank
    must send the same keys: one ``data/skipped/<reason>`` per ``reasons``)."""
    counts = {"data/seen": float(monitor.seen), "data/skipped": float(sum(monitor.skipped.values())),
              "data/truncated": float(monitor.truncated)}
    counts.update({f"data/skipped/{r}": float(monitor.skipped.get(r, 0)) for r in reasons})
    counts = reduce_over_ranks(counts, dist, "sum")
    counts["data/skip_rate"] = counts["data/skipped"] / counts["data/seen"] if counts["data/seen"] else 0.0
    return counts


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (allocated) on GPU; peak resident host memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (:mod:`dmdr.gpus`, for MFU); ``DMDR_PEAK_TFLOPS`` overrides, None when unknown."""
    if os.environ.get("DMDR_PEAK_TFLOPS"):
        return float(os.environ["DMDR_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    gpu = match_cuda_name(torch.cuda.get_device_name(device))
    return gpu.bf16_tflops if gpu is not None else None


class ProgressBar:
    """A rank-0 tqdm bar over generator steps with ETA, on a terminal only; silent elsewhere or when disabled.

    Without a terminal (a SLURM log file, a pipe) the trainer logs :func:`step_line` every ``log.interval`` steps
    instead: a bar redrawn into a file is noise, and nothing at all gives no sign of life."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self._bar = None
        stream = sys.stderr if stream is None else stream
        if enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="dmdr", unit="step", dynamic_ncols=True, file=stream)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, n: int, postfix: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


STEP_LINE_KEYS = (("dmd", "loss/dmd"), ("rl", "loss/rl"), ("fake", "loss/fake"), ("gnorm", "grad_norm/generator"))


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """``step 120/4000 (3.0%) | dmd 0.0123 rl 0.41 fake 0.087 gnorm 0.52 | 1.84 s/step | ETA 1h59m``."""
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)"]
    losses = " ".join(f"{short} {metrics[key]:.4g}" for short, key in STEP_LINE_KEYS if key in metrics)
    if losses:
        parts.append(losses)
    seconds = metrics.get("perf/step_time")
    if seconds:
        left = seconds * max(total - step, 0)
        hours, rest = divmod(int(left), 3600)
        eta = f"ETA {hours}h{rest // 60:02d}m" if hours else f"ETA {rest // 60}m{rest % 60:02d}s"
        parts += [f"{seconds:.3g} s/step", eta]
    return " | ".join(parts)
