"""Users' LoRAs: read them in the formats people have (diffusers / peft, kohya and ComfyUI), check them against the
denoiser they are for, and merge them into its weights, sharded or not.

Re-turbo (``README.md``, "Re-turbo") uses this three ways: ``model.teacher_adapters`` merges the user's LoRAs into the
frozen teacher (and into a full-copy generator), ``model.init_generator`` can be a few-step LoRA that becomes the
generator adapter's first weights, and the preflight reads every such file before any model loads.

One representation for all formats: :data:`LoraDelta`, module name -> ``(A, B)`` with the file's ``alpha / rank``
already folded into ``B``, so the weight change is ``scale * B @ A`` (a convolution: ``B`` is ``(out, r, 1, 1)`` and
``A`` ``(r, in, kh, kw)``, peft's layout). Module names are the denoiser's own (diffusers') ``named_modules`` names,
the keys of its weight files.

Key formats read (the prefix ``transformer.`` / ``unet.`` / ``diffusion_model.`` / ``base_model.model.`` is dropped):

- diffusers / peft: ``<module>.lora_A.weight`` and ``lora_B`` (peft's ``lora_A.default.weight`` too); the rank and
  ``lora_alpha`` of diffusers' ``lora_adapter_metadata`` header when present, else alpha = rank (diffusers' default);
- kohya / ComfyUI: ``lora_unet_<module with "." as "_">.lora_down.weight``, ``lora_up`` and ``.alpha`` (also
  ``lora_transformer_``); the underscores are resolved against the denoiser's module names, as ComfyUI does;
- old diffusers: ``<module>.lora.down.weight`` / ``lora.up`` (``lora_linear_layer.down`` too);
- anything else that diffusers' own converter for the family reads (SDXL's SGM block names, Z-Image's fused qkv):
  when keys are left over, the file is handed to the family pipeline's ``lora_state_dict`` and read again.

Merging (:func:`merge_loras`) is done in float64 and rounded once to the weight's dtype (or through ``round_via``), on
the local block of each weight: a parameter sharded by FSDP2 (a ``DTensor``) merges only its own rows, from the same
full ``A`` and ``B`` on every rank, so a W=2 teacher equals the W=1 one. The adapters' tensors are small (rank r).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdr.errors import ModelLoadError
from dmdr.models.lora import LoRALayer

LoraDelta = dict[str, tuple[Tensor, Tensor]]
"""Module name -> ``(A, B)``, ``alpha / rank`` folded into ``B``; the weight change is ``B @ A``."""
Shapes = Mapping[str, tuple[int, ...]]
"""Module name -> the shape of its ``weight`` (2-D linears, 4-D convolutions)."""

LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_TEXT_ENCODER = ("lora_te", "text_encoder", "te_", "lora_te1_", "lora_te2_")
_SUFFIXES = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"), (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"), (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"), (".alpha", "alpha"),
)
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class AdapterSpec:
    """One ``model.teacher_adapters`` entry: ``PATH[:scale]`` (scale default 1.0)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass  # a colon inside the path
        return cls(text, 1.0)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or a folder (``pytorch_lora_weights.safetensors``, or the
    folder's only ``.safetensors`` file)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / LORA_WEIGHT_FILE).is_file():
            return p / LORA_WEIGHT_FILE
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise ModelLoadError(f"{p} holds {len(found)} .safetensors files and no {LORA_WEIGHT_FILE}: name the LoRA file")
    raise ModelLoadError(f"LoRA {p} does not exist")


def is_lora_state(keys: Iterable[str]) -> bool:
    """Whether weight-file keys are a LoRA's (any key with a LoRA suffix) rather than a model's."""
    return any(k.endswith(suffix) for k in keys for suffix, kind in _SUFFIXES if kind != "alpha")


def weight_shapes(headers: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every 2-D or 4-D ``<module>.weight`` in safetensors headers."""
    out = {}
    for header in headers:
        for key, info in header.items():
            if key.endswith(".weight") and isinstance(info, dict) and len(info.get("shape", ())) in (2, 4):
                out[key[: -len(".weight")]] = tuple(int(d) for d in info["shape"])
    return out


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _split(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _metadata_alpha(metadata: Mapping[str, str] | None) -> float | None:
    """``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` header (one adapter config), if present."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    alpha = next((v for k, v in config.items() if k.endswith("lora_alpha")), None)
    rank = next((v for k, v in config.items() if k.endswith(".r") or k == "r"), None)
    return float(alpha) / float(rank) if alpha and rank else None


def _group(state: Mapping[str, Tensor], shapes: Shapes, alphas: Mapping[str, float]) \
        -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """``{module: {"A", "B", "alpha"}}`` for the keys that name a module of ``shapes``, and the keys that do not."""
    underscored = {name.replace(".", "_"): name for name in shapes}
    groups: dict[str, dict[str, Tensor]] = {}
    left: list[str] = []
    for key, value in state.items():
        split = _split(_strip_prefix(key))
        if split is None:
            left.append(key)
            continue
        name, kind = split
        if name not in shapes:
            bare = next((name[len(p):] for p in _KOHYA_PREFIXES if name.startswith(p)), name)
            name = underscored.get(bare, underscored.get(bare.replace(".", "_"), ""))
        if not name:
            left.append(key)
            continue
        groups.setdefault(name, {})[kind] = value
    for key, alpha in alphas.items():  # diffusers' converters return alphas beside the state dict
        split = _split(_strip_prefix(key)) or (_strip_prefix(key), "alpha")
        if split[0] in groups:
            groups[split[0]]["alpha"] = torch.tensor(float(alpha))
    return groups, left


def _diffusers_converted(file: Path, pipeline_class: str) -> tuple[dict[str, Tensor], dict[str, float]] | None:
    """The state dict (and alphas) the family pipeline's ``lora_state_dict`` makes of ``file``; None without one."""
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None or not hasattr(cls, "lora_state_dict"):
        return None
    try:
        out = cls.lora_state_dict(str(file))
    except Exception:  # noqa: BLE001 - a converter that rejects the file: report our own reading of it
        return None
    state, alphas = (out[0], out[1] or {}) if isinstance(out, tuple) else (out, {})
    return dict(state), dict(alphas)


def read_lora(path: str | Path, shapes: Shapes, *, pipeline_class: str = "", what: str = "LoRA") -> LoraDelta:
    """A LoRA file (or folder) as :data:`LoraDelta` for the denoiser whose weight shapes are ``shapes``.

    Args:
        path: the LoRA (a ``.safetensors`` file, or a folder holding one).
        shapes: the denoiser's module name -> weight shape (:func:`weight_shapes` of its files' headers).
        pipeline_class: the family's diffusers pipeline, whose converter is tried on keys left over.
        what: how error lines name the file's role (``model.teacher_adapters``, ...).

    Raises:
        ModelLoadError: one line naming the file: not a LoRA, text-encoder keys, keys that name no module of the
            denoiser, A and B of different ranks, or factors that do not fit the module (another family or size).
    """
    from safetensors import safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as fh:
            metadata = fh.metadata()
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ModelLoadError(f"{what} {file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if not is_lora_state(state):
        raise ModelLoadError(f"{what} {file} holds no LoRA keys (lora_A/lora_B, lora_down/lora_up): not a LoRA file")
    text = sorted(k for k in state if k.startswith(_TEXT_ENCODER))
    if text:
        raise ModelLoadError(f"{what} {file} has text-encoder LoRA keys ({text[0]}, {len(text)} in all); dmdr applies "
                             "adapters to the denoiser only: save the LoRA without its text-encoder part")
    groups, left = _group(state, shapes, {})
    if left and pipeline_class:
        converted = _diffusers_converted(file, pipeline_class)
        if converted is not None:
            groups2, left2 = _group(converted[0], shapes, converted[1])
            if len(left2) < len(left):
                groups, left = groups2, left2
    if left:
        example = sorted(left)[0]
        if not groups:
            raise ModelLoadError(f"{what} {file}: none of its {len(state)} keys names a layer of this model's denoiser "
                                 f"(e.g. {example!r}): a LoRA for another model family or base")
        raise ModelLoadError(f"{what} {file}: {len(left)} of its {len(state)} keys name no layer of this model's "
                             f"denoiser (e.g. {example!r}); refusing to apply part of it")
    default_scale = _metadata_alpha(metadata)
    out: LoraDelta = {}
    for name, parts in sorted(groups.items()):
        if "A" not in parts or "B" not in parts:
            missing = "lora_B/lora_up" if "A" in parts else "lora_A/lora_down"
            raise ModelLoadError(f"{what} {file}: layer {name} has no {missing} weight")
        a, b = parts["A"].to(torch.float64), parts["B"].to(torch.float64)
        rank = a.shape[0]
        if b.ndim < 2 or b.shape[1] != rank:
            raise ModelLoadError(f"{what} {file}: layer {name} has mismatched ranks (lora_A/down rank {rank}, "
                                 f"lora_B/up {list(b.shape)}); the file is corrupt or mixes two LoRAs")
        shape = tuple(shapes[name])
        fits = (b.shape[0] == shape[0] and a.ndim == len(shape) and tuple(a.shape[1:]) == shape[1:]
                and (len(shape) == 2 or tuple(b.shape[2:]) == (1, 1)))
        if not fits:
            raise ModelLoadError(f"{what} {file}: layer {name} is {list(shape)} in this model, the LoRA's factors are "
                                 f"{list(b.shape)} x {list(a.shape)}: a LoRA for another model family or size")
        if "alpha" in parts:
            scale = float(parts["alpha"]) / rank
        else:
            scale = default_scale if default_scale is not None else 1.0
        out[name] = (a, b * scale)
    return out


def lora_rank(delta: LoraDelta) -> int:
    """The rank of a LoRA whose layers all share one (else a one-line error)."""
    ranks = sorted({a.shape[0] for a, _ in delta.values()})
    if len(ranks) != 1:
        raise ModelLoadError(f"the LoRA has layers of ranks {ranks}; a generator adapter needs one rank")
    return ranks[0]


# ------------------------------------------------------------------------------------------------ merge
def clean_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def weight_modules(net: nn.Module) -> dict[str, nn.Module]:
    """The modules holding each linear / convolution weight of ``net``, by the network's plain (file) names:
    wrappers (activation checkpointing, compile) seen through, a LoRA layer's ``base`` under the layer's name."""
    wrapped = {name for name, m in net.named_modules() if isinstance(m, LoRALayer)}
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoRALayer):
            out[clean_name(name)] = module.base
        elif isinstance(module, nn.Linear | nn.Conv2d) and name.rpartition(".")[0] not in wrapped:
            out[clean_name(name)] = module
    return out


def local_block(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The local storage of a parameter (this rank's block of a ``DTensor``) and its offset in the full tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local().detach(), tuple(offset)
    return t.detach(), (0,) * t.ndim


def delta_block(a: Tensor, b: Tensor, offset: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Rows / columns ``offset : offset + shape`` of the weight change ``B @ A`` (float64), computed from the factors'
    matching slices only (never the whole ``out x in`` matrix)."""
    rows = slice(offset[0], offset[0] + shape[0])
    cols = slice(offset[1], offset[1] + shape[1])
    b_rows, a_cols = b[rows].double(), a[:, cols].double()
    if a.ndim == 2:
        return b_rows @ a_cols
    return torch.einsum("or,rikl->oikl", b_rows[:, :, 0, 0], a_cols[:, :, offset[2]: offset[2] + shape[2],
                                                                     offset[3]: offset[3] + shape[3]])


@torch.no_grad()
def merge_loras(net: nn.Module, loras: Sequence[tuple[LoraDelta, float]], round_via: torch.dtype | None = None) -> int:
    """Add ``sum scale * B @ A`` of ``loras`` to ``net``'s weights in place; returns the number of weights changed.

    Each weight is updated once: ``W <- round(W + sum_i s_i B_i A_i)``, summed in float64 and rounded to the weight's
    dtype, through ``round_via`` first when given (a fp32 copy of a bf16 teacher then holds the bf16 teacher's merged
    values, as a copy of the merged teacher would). Works on the local block of a sharded (``DTensor``) weight.
    """
    modules = weight_modules(net)
    names = sorted({n for delta, _ in loras for n in delta})
    missing = [n for n in names if n not in modules]
    if missing:
        raise ModelLoadError(f"the LoRA names layer {missing[0]!r}, which this network lacks ({len(missing)} in all)")
    for name in names:
        weight = modules[name].weight
        local, offset = local_block(weight)
        if local.numel() == 0:
            continue
        total = torch.zeros(local.shape, dtype=torch.float64, device=local.device)
        for delta, scale in loras:
            if name in delta:
                a, b = delta[name]
                total += scale * delta_block(a.to(local.device), b.to(local.device), offset, local.shape)
        merged = local.double() + total
        if round_via is not None:
            merged = merged.to(round_via)
        local.copy_(merged.to(local.dtype))
    return len(names)


@torch.no_grad()
def set_adapter(net: nn.Module, adapter: str, delta: LoraDelta, what: str = "LoRA") -> None:
    """Start adapter ``adapter`` of ``net``'s LoRA layers at ``delta``: ``lora_A = A``, ``lora_B = B / (alpha/r)``
    (the layer multiplies by its own ``alpha / r``); layers ``delta`` does not name keep their initialisation.

    Raises:
        ModelLoadError: a layer of ``delta`` without the adapter (``model.lora_targets`` do not cover it), or a rank
            other than the adapter's.
    """
    layers = {clean_name(n): m for n, m in net.named_modules() if isinstance(m, LoRALayer) and adapter in m.lora_A}
    for name, (a, b) in delta.items():
        layer = layers.get(name)
        if layer is None:
            raise ModelLoadError(f"{what}: layer {name} has no {adapter} adapter (add it to --model.lora_targets, "
                                 f"which now give {len(layers)} layers)")
        rank = layer.lora_A[adapter].shape[0]
        if a.shape[0] != rank:
            raise ModelLoadError(f"{what} has rank {a.shape[0]}, the {adapter} adapter rank {rank}: set "
                                 f"--model.generator_lora_rank {a.shape[0]}")
        for param, full in ((layer.lora_A[adapter], a), (layer.lora_B[adapter], b / layer.lora_scaling[adapter])):
            local, offset = local_block(param)
            index = tuple(slice(o, o + s) for o, s in zip(offset, local.shape))
            local.copy_(full[index].to(local.dtype))


def adapter_summary(specs: Sequence[AdapterSpec], deltas: Sequence[LoraDelta]) -> list[dict[str, Any]]:
    """What provenance and the model card say of each adapter: file, scale, rank(s) and layers."""
    out = []
    for spec, delta in zip(specs, deltas):
        ranks = sorted({a.shape[0] for a, _ in delta.values()})
        out.append({"path": spec.path, "scale": spec.scale, "rank": ranks[0] if len(ranks) == 1 else ranks,
                    "layers": len(delta)})
    return out

