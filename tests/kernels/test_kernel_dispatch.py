"""Dispatch: Triton on CUDA, the reference elsewhere, DMDR_KERNELS overrides, lazy kernel imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dmdr import kernels


def _all_ops(dtype=torch.float32):
    x = torch.randn(2, 3, 4, 5, dtype=dtype)
    t = torch.tensor([0.2, 0.7])
    w = torch.randn(6, 5, dtype=dtype)
    a, b = torch.randn(2, 5, dtype=dtype), torch.randn(6, 2, dtype=dtype)
    return [
        lambda: kernels.renoise(x, x, t),
        lambda: kernels.dmd_score_difference(x, x, t, x, x, 3.0, x),
        lambda: kernels.dmd_score_difference_eps(x, x, t, x, x, 3.0, x),
        lambda: kernels.dmd_loss_fused(x, x, t, x, x, 3.0, x),
        lambda: kernels.lora_linear(x, w, None, a, b, 0.5),
    ]


def test_cpu_default_is_the_reference(monkeypatch, poison):
    monkeypatch.delenv("DMDR_KERNELS", raising=False)
    assert kernels.backend() == "auto" and not kernels.use_triton(torch.zeros(1))
    for op in _all_ops():
        op()
    assert poison == []  # no Triton buffer was ever allocated


def test_reference_override(monkeypatch, poison):
    monkeypatch.setenv("DMDR_KERNELS", "reference")
    assert not kernels.use_triton(torch.zeros(1))
    for op in _all_ops():
        op()
    assert poison == []


def test_triton_override_runs_every_op(triton_backend, poison):
    for op in _all_ops():
        before = len(poison)
        op()
        assert len(poison) > before


def test_unsupported_dtype_takes_the_reference(triton_backend, poison):
    for op in _all_ops(torch.float64):
        op()
    assert poison == []


def test_bad_backend_names_the_choices(monkeypatch):
    monkeypatch.setenv("DMDR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, triton, reference"):
        kernels.backend()


def test_forced_triton_on_cpu_without_interpreter_says_how(triton_backend, monkeypatch):
    from dmdr.kernels import launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.renoise(torch.zeros(2, 3), torch.zeros(2, 3), 0.5)


def test_import_does_not_define_kernels():
    """``import dmdr.kernels`` must not import the @triton.jit modules (TRITON_INTERPRET is read then)."""
    code = ("import sys, dmdr.kernels, dmdr.models.lora, dmdr.losses.dmd; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith('dmdr.kernels.') and m.endswith('_triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
