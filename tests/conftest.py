"""Suite-wide settings: CPU only, deterministic, Triton (if exercised) through its interpreter."""

import os

# Triton reads this when a kernel is defined; kernel modules are imported lazily, after this line.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytest.mark.usefixtures("one_thread")``).

    Tiny networks gain nothing from a second thread, and when the 2 cores are shared with other
    processes (the distributed tests' ranks) spin-waiting threads make each op several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
