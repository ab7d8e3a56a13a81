"""The second device: ``hostdev`` (hostdev.cpp), built once per machine and loaded once per test session.

Every test here is marked ``second_device`` (``pytest -m second_device`` runs them alone). They run in CI with the
rest: where a C++ compiler exists the device is built and a failed build fails these tests; only a machine with no
compiler at all skips them, with that reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.devices import hostdev as backend

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    ours = [item for item in items if Path(str(item.fspath)).resolve().parent == HERE]
    for item in ours:
        item.add_marker(pytest.mark.second_device)
    if ours:
        _register_before_any_backward()


def _register_before_any_backward() -> None:
    """Register the device before any test runs: autograd's engine sizes its per-device queues at the first
    backward of the process, so a device registered after another test ran a backward cannot run one itself
    (an internal assert in torch/csrc/autograd/engine.cpp). A failed build is reported by the fixture."""
    if backend.compiler_available():
        try:
            backend.load()
        except Exception:  # noqa: BLE001 - the ``hostdev`` fixture loads again and fails the tests with the error
            pass


@pytest.fixture(scope="session")
def hostdev():
    """The registered device ``torch.device("hostdev")``; the extension module (``fallback_calls()``)."""
    if not backend.compiler_available():
        pytest.skip("no C++ compiler on this machine: the hostdev test device cannot be built")
    return backend.load()
