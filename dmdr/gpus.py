"""The GPUs dmdr knows: memory and dense bf16 peak, one table for the planner and the trainer's MFU.

Memory is what ``torch.cuda.get_device_properties(i).total_memory`` reports for the card (GiB);
peak is NVIDIA's dense (no sparsity) bf16 tensor-core number from the data sheets. ``cuda_names``
are substrings of ``torch.cuda.get_device_name`` that identify the card (first match wins, so the
more specific names come first).
"""

from __future__ import annotations

from dataclasses import dataclass

from dmdr.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    """One accelerator model."""

    name: str
    memory_gib: float
    bf16_tflops: float
    cuda_names: tuple[str, ...]

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)


GPUS: dict[str, GPU] = {
    "h200": GPU("NVIDIA H200 141GB (SXM)", 140.4, 989.0, ("H200",)),
    "h100-80": GPU("NVIDIA H100 80GB (SXM)", 79.2, 989.0, ("H100",)),
    "a100-80": GPU("NVIDIA A100 80GB (SXM)", 79.3, 312.0, ("A100-SXM4-80GB", "A100 80GB", "A100-80GB")),
    "a100-40": GPU("NVIDIA A100 40GB (SXM)", 39.6, 312.0, ("A100",)),
    "l40s": GPU("NVIDIA L40S 48GB", 44.4, 362.0, ("L40S",)),
    "a10": GPU("NVIDIA A10 24GB", 22.1, 125.0, ("A10",)),  # after the A100s: "A10" is in their names
}


def get_gpu(name: str) -> GPU:
    """The table entry ``name``; an unknown name is one line listing the known ones."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name!r} is not a GPU the planner knows; known: {', '.join(GPUS)}") from None


def match_cuda_name(device_name: str) -> GPU | None:
    """The entry whose ``cuda_names`` occur in ``device_name`` (``torch.cuda.get_device_name``), or None."""
    for gpu in GPUS.values():
        if any(key in device_name for key in gpu.cuda_names):
            return gpu
    return None
