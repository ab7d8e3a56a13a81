"""Build (once, cached) and register ``hostdev``: a second device whose memory is on the host.

``load()`` compiles ``hostdev.cpp`` with torch.utils.cpp_extension (the first time on a machine: about a
minute; then the cached build is reused while the source is unchanged), renames PyTorch's PrivateUse1 backend
to ``hostdev`` and registers the ``torch.hostdev`` module, so ``torch.device("hostdev")`` works like
``torch.device("cuda")`` does on a GPU machine: tensors, generators, ``.to()``, ``Module.to()``, and every op
(computed on the host). Mixing it with CPU tensors raises, as mixing CUDA and CPU does.

The build directory is ``$DMDR_HOSTDEV_BUILD`` or the torch extensions cache (``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``); cpp_extension locks it, so parallel test processes build it once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import types
from pathlib import Path

import torch

NAME = "hostdev"
EXTENSION = "dmdr_hostdev"
STALE_LOCK_S = 900
"""A build lock older than this is a killed build's (a build takes about a minute on 2 busy cores)."""
SOURCE = Path(__file__).with_name("hostdev.cpp")
_extension = None


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


class _Stream:
    """hostdev's one stream: work on it is synchronous, so it is always done (what DCP's loaders ask)."""

    device_type = NAME

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = _Stream()


def _device_module(ext) -> types.ModuleType:
    """``torch.hostdev``: what PyTorch asks of a device module (RNG and device queries)."""
    mod = types.ModuleType(f"torch.{NAME}")

    mod.is_available = lambda: True
    mod.is_initialized = lambda: True
    mod._is_in_bad_fork = lambda: False
    mod.device_count = lambda: 1
    mod.current_device = lambda: 0
    mod.set_device = lambda device: None
    mod.synchronize = lambda device=None: None
    mod.current_stream = lambda device=None: _STREAM
    mod.stream = lambda stream: contextlib.nullcontext()
    # The default hostdev generator shares the default CPU generator (hostdev.cpp): seeding one seeds both.
    # (torch.manual_seed calls manual_seed_all here: these touch only the CPU generator, never recurse.)
    cpu = torch.default_generator
    mod.manual_seed = mod.manual_seed_all = lambda seed: cpu.manual_seed(seed)
    mod.seed = mod.seed_all = lambda: cpu.seed()
    mod.initial_seed = lambda: cpu.initial_seed()
    mod.get_rng_state = lambda device=None: cpu.get_state()
    mod.set_rng_state = lambda state, device=None: cpu.set_state(state)
    mod.get_rng_state_all = lambda: [cpu.get_state()]
    mod.set_rng_state_all = lambda states: cpu.set_state(states[0])
    mod.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
    mod.fallback_calls = ext.fallback_calls
    return mod


def load(verbose: bool = False):
    """Build or reuse the extension and register the device; returns the extension module. Idempotent."""
    global _extension
    if _extension is not None:
        return _extension
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as load_extension

    build = Path(os.environ.get("DMDR_HOSTDEV_BUILD") or _get_build_directory(EXTENSION, verbose))
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # left by a build that was killed: cpp_extension would wait on it forever
    ext = load_extension(name=EXTENSION, sources=[str(SOURCE)], build_directory=str(build),
                         extra_cflags=["-O1"], verbose=verbose)
    current = torch._C._get_privateuse1_backend_name()
    if current != NAME:
        if current != "privateuseone":
            raise RuntimeError(f"PrivateUse1 is already registered as {current!r} in this process")
        torch.utils.rename_privateuse1_backend(NAME)
        torch._register_device_module(NAME, _device_module(ext))
        torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)
    _extension = ext
    return ext
