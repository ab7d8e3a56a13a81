"""Suite-wide settings: CPU only, deterministic, Triton (if exercised) through its interpreter; the shared fixtures."""

import os

# Triton reads this when a kernel is defined; kernel modules are imported lazily, after this line.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["tests.tiny_models"]  # the tiny assets and reward checkpoints every area may use


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



@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """No log handler writes to a stream that an earlier test's output capture closed.

    ``logging.basicConfig`` (``dmdr.launch.main`` and the tools call it) and the libraries' own loggers (diffusers,
    transformers) bind ``sys.stderr`` as it is when they first log: inside a test using ``capsys`` that is a capture
    closed afterwards, and a later record (even from a module fixture's setup) would print a "--- Logging error ---"
    traceback into another test's stderr, which the one-line error checks read. So before each test's fixtures
    are set up, every plain StreamHandler is pointed at the current ``sys.stderr``.
    """
    import logging
    import sys

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for log in loggers:
        for handler in log.handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr:
                handler.stream = sys.stderr  # not setStream: it would flush the closed stream first
