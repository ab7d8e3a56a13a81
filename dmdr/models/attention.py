"""The denoisers' attention backend (``model.attention``): a name of diffusers' attention dispatcher.

diffusers routes attention through ``diffusers.models.attention_dispatch``; a model's
``set_attention_backend(name)`` points every attention processor that goes through the dispatcher
at one backend (``native`` = torch SDPA, ``flash`` / ``flash_varlen`` = flash-attn 2, ``_flash_3`` =
flash-attn 3, ``sage``, ``xformers``, ``flex``, ...). dmdr adds ``auto`` and checks the choice
against the device, the installed packages and the model family before any weights are touched,
because diffusers itself only checks the package (a CUDA-only kernel on CPU fails at the first
forward, deep inside the kernel).

* ``auto``: flash-attn when it imports and the run is on CUDA, native SDPA otherwise.
* A family whose transformer passes a padding mask (Z-Image: captions of different lengths in one
  batch) needs a backend that takes one: ``auto`` picks ``flash_varlen`` there, and asking for
  ``flash`` stops naming ``flash_varlen`` (flash-attn's dense kernel takes no mask).
* ``*_hub`` backends download kernels from the Hugging Face Hub at run time; dmdr never downloads.

Backends are set per network (:meth:`dmdr.models.base.Denoiser.set_attention_backend`), before
activation checkpointing, compile and FSDP2 wrap it (:func:`dmdr.build.build_models`).
"""

from __future__ import annotations

import functools

import torch

from dmdr.errors import ConfigError

AUTO = "auto"
NATIVE = "native"
ALIASES = {"flash3": "_flash_3", "flash3_varlen": "_flash_varlen_3"}
"""Spellings of the issue tracker and the docs for diffusers' private flash-attn 3 names."""
INSTALL = 'pip install -e ".[gpu]"'
CPU_BACKENDS = frozenset({"native", "_native_math", "flex"})
"""Backends that run on CPU tensors; every other one needs a CUDA (or NPU / XLA) device."""
MASKED_TWIN = {"flash": "flash_varlen", "_flash_3": "_flash_varlen_3", "sage": "sage_varlen"}
"""Backends whose kernel takes no attention mask, and the variable-length twin that does."""
_FLASH_2 = frozenset({"flash", "flash_varlen"})
"""flash-attn 2, the ``gpu`` extra of pyproject.toml (flash-attn 3 is built from source)."""


@functools.cache
def backend_names() -> tuple[str, ...]:
    """Every backend name of the installed diffusers' dispatcher (``AttentionBackendName`` values)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(b.value for b in AttentionBackendName)


def canonical(name: str) -> str:
    """``name`` lower-cased with the aliases resolved (``flash3`` -> ``_flash_3``)."""
    name = name.strip().lower()
    return ALIASES.get(name, name)


def check_name(name: str) -> str:
    """The canonical name if it is ``auto`` or a dispatcher backend dmdr can use; else one ConfigError line.

    ``auto`` and ``native`` are answered without importing diffusers (config validation stays fast).
    """
    name = canonical(name)
    if name in (AUTO, NATIVE):
        return name
    names = backend_names()
    if name not in names:
        usable = [n for n in names if not n.startswith("_") and not n.endswith("_hub")]
        raise ConfigError(f"--model.attention {name!r} is not one of auto, {', '.join(usable)} "
                          "(or a private diffusers name such as _flash_3)")
    if name.endswith("_hub"):
        raise ConfigError(f"--model.attention {name}: hub backends download kernels at run time and dmdr never "
                          f"downloads; install the package and use {name.removesuffix('_hub')} instead")
    return name


def flash_attn_usable() -> bool:
    """Whether diffusers found a usable flash-attn 2 (installed, recent enough, and it imported)."""
    from diffusers.models import attention_dispatch

    return bool(attention_dispatch._CAN_USE_FLASH_ATTN)


def resolve_attention(name: str, device: torch.device, *, masked: bool = False, family: str = "") -> str:
    """The dispatcher backend a run uses for ``model.attention = name`` on ``device``.

    Args:
        name: the config value (``auto`` or a dispatcher name).
        device: the device the denoisers run on.
        masked: whether the family's transformer passes a padding mask to attention.
        family: for the messages.

    Raises:
        ConfigError: one line naming the backend and the fix (the install command for flash-attn).
    """
    name = check_name(name)
    if name == AUTO:
        if device.type == "cuda" and flash_attn_usable():
            return "flash_varlen" if masked else "flash"
        return NATIVE
    if device.type == "cpu" and name not in CPU_BACKENDS:
        what = "flash-attn" if name in _FLASH_2 else f"the {name} backend"
        fix = f", or on a CUDA machine install it with {INSTALL}" if name in _FLASH_2 else ""
        raise ConfigError(f"--model.attention {name}: {what} runs only on GPUs and this run is on cpu; use "
                          f"--model.attention native (or auto){fix}")
    if masked and name in MASKED_TWIN:
        raise ConfigError(f"--model.attention {name}: the {family or 'model'} transformer passes a padding "
                          f"mask and {name} takes none; use --model.attention {MASKED_TWIN[name]} (or auto)")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        hint = f"install it with {INSTALL}" if name in _FLASH_2 else "install the package it names"
        raise ConfigError(f"--model.attention {name}: not usable here ({reason}); {hint}") from None
    return name


__all__ = ["AUTO", "NATIVE", "INSTALL", "backend_names", "canonical", "check_name", "flash_attn_usable",
           "resolve_attention"]
