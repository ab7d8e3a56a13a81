"""benchmarks/gpu_check.py's CPU mode (what CI can run of it): it says it needs CUDA, runs the kernel checks
in the Triton interpreter, prints one table and exits 0; a wrong kernel makes it exit 1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode of the check")


def test_cpu_mode_runs_the_interpreter_checks_and_exits_0(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("DMDR_KERNELS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a CUDA GPU" in proc.stdout and "GPU figures: unmeasured" in proc.stdout
    checks = [line for line in proc.stdout.splitlines() if line.startswith("| kernel check |")]
    ops = {line.split("|")[2].split()[0] for line in checks}
    assert ops == {"renoise", "dmd_score_difference", "dmd_score_difference_eps", "dmd_loss_fused", "lora_linear"}
    assert len(checks) == 12 and all(line.rstrip().endswith("| yes |") for line in checks)  # 6 per dtype
    assert "float32" in proc.stdout and "float16" in proc.stdout
    assert (tmp_path / "gpu_check.md").read_text().count("| kernel check |") == 12


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    bad = {"op": "renoise", "shape": "3x4x17x19", "dtype": "float32", "max_rel_err": "3.00e-02", "tol": "1e-05",
           "ok": False}
    monkeypatch.setattr(gpu_check.profile, "interpreter_checks", lambda device, dtypes=None: [bad])
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert "| kernel check | renoise float32 3x4x17x19 |" in capsys.readouterr().out
