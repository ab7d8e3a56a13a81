"""Fixtures for the Triton kernel tests: forced Triton backend, poisoned buffers, fresh inputs, JIT keys.

The suite-wide conftest sets ``TRITON_INTERPRET=1`` before anything imports a kernel module, so the
Triton code runs on CPU tensors through the interpreter here.
"""

from __future__ import annotations

import zlib

import pytest
import torch

POISON = float("nan")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path (``DMDR_KERNELS=triton``) for the test."""
    monkeypatch.setenv("DMDR_KERNELS", "triton")


@pytest.fixture
def poison(monkeypatch):
    """Every buffer a kernel writes starts as NaN: an element a kernel forgets stays NaN.

    Returns the list of buffers handed out, so a test can check how many the kernels allocated.
    """
    from dmdr.kernels import launch

    handed_out = []

    def poisoned(shape, dtype, device):
        buf = torch.full(shape, POISON, dtype=dtype, device=device)
        handed_out.append(buf)
        return buf

    monkeypatch.setattr(launch, "alloc", poisoned)
    return handed_out


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs for every case, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
