"""Working from the repo root: there the top-level ``kernels/`` folder (``dmdr.kernels``) is on ``sys.path``
under the name of the Hugging Face ``kernels`` package that transformers imports, and must not pose as it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_models_import_from_the_repo_root():
    code = ("from transformers import CLIPModel\n"
            "from dmdr.models.tiny import build_tiny\n"
            "import dmdr.kernels\n"
            "try:\n"
            "    import kernels  # the Hugging Face package where installed, never this repo's folder\n"
            "    assert not hasattr(kernels, 'renoise'), kernels.__file__\n"
            "except ModuleNotFoundError:\n"
            "    pass\n"
            "print(dmdr.kernels.renoise)\n")
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "function renoise" in done.stdout


@pytest.mark.slow
def test_python_m_pytest_runs_model_tests_from_the_repo_root():
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/test_tiny.py::test_tokenizers_round_trip")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "1 passed" in done.stdout
