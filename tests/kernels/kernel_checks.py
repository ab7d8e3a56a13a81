"""Checks the kernel tests share: scaled tolerances and the GPU JIT specialization key of a launch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def assert_scaled_close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """``max |got - ref| <= tol * max(1, max |ref|)``, with a message that says by how much it failed."""
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    bound = tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@contextmanager
def gpu_specialization_keys(kernel) -> Iterator[list[str]]:
    """Record, for each launch of ``kernel``, the key Triton's GPU JIT would cache its compilation under.

    The interpreter keeps no compilation cache, so this rebuilds the GPU binder of
    ``triton.runtime.jit.JITFunction`` for the same Python function and applies it to the arguments of
    every interpreted launch. Two launches with equal keys reuse one compiled kernel on a GPU
    (``JITFunction.run`` looks its cache up with exactly this specialization plus the launch options).
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    interpreted = kernel.fn if isinstance(kernel, Autotuner) else kernel
    jit = JITFunction(interpreted.fn)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    keys: list[str] = []

    def record(*args, **kwargs):
        _, specialization, _ = binder(*args, **kwargs)
        keys.append(repr(specialization))

    interpreted.add_pre_run_hook(record)
    try:
        yield keys
    finally:
        interpreted.pre_run_hooks.remove(record)
