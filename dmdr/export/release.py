"""The release forms besides the merged pipeline: the generator's LoRA as a diffusers LoRA file (extracted by SVD
from a full fine-tune when there is no adapter), and the distilled transformer as one safetensors file.

Key format, alpha folding and the SVD: ``dmdr/export/README.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dmdr.errors import ConfigError
from dmdr.models.families import FAMILIES, family_spec
from dmdr.models.family import LoraFormat
from dmdr.models.lora import lora_layers

log = logging.getLogger("dmdr")

LORA_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' ``LORA_WEIGHT_NAME_SAFE``: the name ``load_lora_weights(folder)`` looks for first."""


def lora_format(family_name: str) -> LoraFormat:
    fmt = family_spec(family_name).lora_format
    if fmt is None:
        have = ", ".join(f.name for f in FAMILIES.values() if f.lora_format is not None)
        raise ConfigError(f"--lora: no diffusers LoRA key format for model family {family_name!r} "
                          f"(have: {have}); export the merged pipeline instead")
    return fmt


LoraLayers = dict[str, tuple[Tensor, Tensor]]
"""Module name -> ``(A, B)``, ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)``, scale already in ``B``."""


@torch.no_grad()
def generator_lora(net: nn.Module, adapter: str) -> LoraLayers:
    """Adapter ``adapter`` of ``net``'s LoRA layers as fp32 ``(A, alpha/r * B)`` (the delta is ``B A``)."""
    out: LoraLayers = {}
    for name, layer in lora_layers(net):
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].float(), layer.lora_B[adapter].float()
            out[name.replace("_checkpoint_wrapped_module.", "")] = (a.clone(), b * layer.lora_scaling[adapter])
    if not out:
        raise ConfigError(f"the generator network has no LoRA adapter {adapter!r} to export")
    return out


def lora_state_dict(layers: LoraLayers, family: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """The diffusers-format LoRA state dict of ``layers`` for ``family`` (see the module doc), in ``dtype``."""
    fmt = lora_format(family)
    out = {}
    for name, (a, b) in sorted(layers.items()):
        key = f"{fmt.prefix}.{fmt.rename(name)}"
        out[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


LORA_FORMATS = ("diffusers", "kohya")
"""``--lora-format`` choices."""


def kohya_state_dict(layers: LoraLayers, family: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """``layers`` in kohya's / ComfyUI's key layout for ``family``: ``<kohya_prefix><module with . as _>`` +
    ``.lora_down.weight`` (A), ``.lora_up.weight`` (B, alpha/rank already folded in) and ``.alpha`` = rank (fp32; so
    the loaders' alpha/rank is 1). The module names are the loader's (``LoraFormat.rename``), or the original
    checkpoint's where the family says so (``LoraFormat.kohya_modules``: FLUX.1's BFL names, fused q/k/v)."""
    fmt = lora_format(family)
    named = (fmt.kohya_modules(layers) if fmt.kohya_modules is not None else
             {fmt.rename(name): pair for name, pair in layers.items()})
    out = {}
    for name, (a, b) in sorted(named.items()):
        key = fmt.kohya_prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = b.to(dtype).contiguous()
        # fp32 whatever ``dtype``: bf16 holds integers exactly only up to 256 (a fused FLUX q/k/v rank is 3r)
        out[f"{key}.alpha"] = torch.tensor(float(a.shape[0]), dtype=torch.float32)
    return out


def lora_file_name(lora_format_name: str, out: str | Path) -> str:
    """The LoRA file of an export: diffusers' :data:`LORA_FILE`, or ``<out name>.safetensors`` for kohya's layout
    (UIs list LoRAs by file name; diffusers loads it with ``weight_name=``)."""
    return LORA_FILE if lora_format_name == "diffusers" else f"{Path(out).name}.safetensors"


def write_lora(folder: Path, state: dict[str, Tensor], metadata: dict[str, str], name: str = LORA_FILE) -> Path:
    """Save ``state`` as ``name`` in ``folder`` (``metadata``: informative strings in the header)."""
    path = Path(folder) / name
    save_file(state, str(path), metadata={"format": "pt", **metadata})
    return path


def write_single_file(path: Path, transformer: nn.Module, metadata: dict[str, str]) -> Path:
    """The transformer's state dict, diffusers-keyed, as one safetensors file."""
    state = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", **metadata})
    return path


# ----------------------------------------------------------------------------------------------- SVD
@dataclass
class Extraction:
    """A LoRA extracted from a full fine-tune, and what it leaves out."""

    layers: LoraLayers
    rank: int
    relative_error: float
    """``||dW - B A||_F / ||dW||_F`` over all extracted linears together (0 when nothing changed)."""
    left_out: list[str] = field(default_factory=list)
    """Parameters that changed but are not ``nn.Linear`` weights (not representable as a LoRA)."""
    left_out_relative: float = 0.0
    """``||d theta||_F / ||theta_base||_F`` over :attr:`left_out` together."""

    def summary(self) -> dict[str, object]:
        return {"rank": self.rank, "relative_error": self.relative_error, "layers": len(self.layers),
                "left_out": len(self.left_out), "left_out_relative_change": self.left_out_relative}


def base_parameters(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s own parameters by their plain diffusers names: LoRA wrappers seen through, adapters dropped."""
    wrapped = {f"{name}.base.": f"{name}." for name, _ in lora_layers(net)}
    out = {}
    for key, value in net.state_dict().items():
        key = key.replace("_checkpoint_wrapped_module.", "")
        if ".lora_A." in key or ".lora_B." in key:
            continue
        for old, new in wrapped.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


@torch.no_grad()
def extract_lora(tuned: nn.Module, base: dict[str, Tensor], rank: int) -> Extraction:
    """The rank-``rank`` LoRA closest to ``tuned - base`` on every changed ``nn.Linear`` weight (module doc).

    Args:
        tuned: the fine-tuned network (plain diffusers module names, no LoRA layers).
        base: the base network's parameters by the same names (:func:`base_parameters`).
    """
    if rank < 1:
        raise ConfigError(f"--lora-rank {rank}: give a rank >= 1")
    linear_weights = {f"{n}.weight" for n, m in tuned.named_modules() if isinstance(m, nn.Linear)}
    layers: LoraLayers = {}
    err2 = total2 = other2 = other_base2 = 0.0
    left_out = []
    for key, value in tuned.state_dict().items():
        if key not in base:
            raise ConfigError(f"--lora-rank: the base network has no parameter {key!r}; is the run's teacher the "
                              "base this generator was fine-tuned from?")
        delta = value.double() - base[key].double()
        if not torch.any(delta):
            continue
        if key not in linear_weights:
            left_out.append(key)
            other2 += delta.pow(2).sum().item()
            other_base2 += base[key].double().pow(2).sum().item()
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        layers[key[: -len(".weight")]] = (a.float(), b.float())
        total2 += s.pow(2).sum().item()
        err2 += s[r:].pow(2).sum().item()
    if not layers:
        raise ConfigError("--lora-rank: no linear weight of the generator differs from the teacher's; "
                          "nothing to extract (was the run trained?)")
    return Extraction(layers, rank, math.sqrt(err2 / total2) if total2 else 0.0, left_out,
                      math.sqrt(other2 / other_base2) if other_base2 else 0.0)
