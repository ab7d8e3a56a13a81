"""LoRA with runtime scales: one frozen base, named adapters, scales read at call time.

Why not peft's layers: peft keeps one float scale per adapter and changes it by mutating every
layer, so the DMDR trick (real score at ``s_r``, fake score at ``s_f``, and the unconditional branch,
as ONE batched forward with a per-sample scale) cannot be expressed. Here every wrapped layer
(``nn.Linear``: :class:`LoRALinear`; ``nn.Conv2d``, for UNets: :class:`LoRAConv2d`) reads its adapters'
scales from a shared :class:`LoRAScales` object, which holds a float or a per-sample ``(B,)`` tensor per
adapter. Changing a scale re-wraps, recompiles and copies nothing.

The linear's matmul goes through :func:`dmdr.kernels.lora_linear` (fused Triton on GPU, torch reference
on CPU); the convolution's adapter is two plain ``conv2d`` calls.

Initialisation (one rule for every path: a model loaded whole, or built on the meta device, sharded
and materialised at any world size): ``lora_B = 0`` (the adapter starts as a no-op) and ``lora_A``
kaiming-uniform like peft's, drawn from a ``torch.Generator`` seeded by ``(seed, module, adapter)``:
the run's seed, the wrapped linear's qualified name in the network LoRA was injected into (the
namespace of the weight files) and the adapter name. No global RNG is read, so every rank draws the
same adapter and a W=2 run starts from exactly the W=1 weights. See :func:`lora_init`.

Activation checkpointing re-runs forwards during backward, after the scales may have changed:
checkpoint wrappers must pass :func:`checkpoint_context_fn` (``dmdr.distributed`` does) so that the
recomputation sees the scales its forward saw.
"""

from __future__ import annotations

import hashlib
import math
import re
import weakref
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr import kernels
from dmdr.parameterization import expand_like


class LoRAScales:
    """The runtime scales of one model's adapters (the multiplier on top of ``alpha / rank``)."""

    def __init__(self) -> None:
        self._values: dict[str, float | Tensor] = {}
        _LIVE_SCALES.add(self)

    def set(self, **values: float | Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, Tensor) and value.ndim > 1:
                raise ValueError(f"LoRA scale for {name!r} must be a float or a (B,) tensor")
            self._values[name] = value

    def get(self, name: str) -> float | Tensor:
        return self._values.get(name, 0.0)

    def snapshot(self) -> dict[str, float | Tensor]:
        return dict(self._values)

    def restore(self, values: dict[str, float | Tensor]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"LoRAScales({self._values})"


_LIVE_SCALES: weakref.WeakSet[LoRAScales] = weakref.WeakSet()


def checkpoint_context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: recomputation sees the LoRA scales of its forward.

    Activation checkpointing re-runs a block's forward during backward. By then the same network may
    have been called at other scales (the generator step's teacher forward sets the critic and generator
    adapters' scales between the generator's forward and its backward), so without this the recompute
    would use the wrong scales: silently wrong gradients, or a shape error for per-sample scales.
    """
    forward_time = [(scales, scales.snapshot()) for scales in _LIVE_SCALES]
    return nullcontext(), _scales_restored(forward_time)


@contextmanager
def _scales_restored(saved: list[tuple[LoRAScales, dict[str, float | Tensor]]]) -> Iterator[None]:
    current = [(scales, scales.snapshot()) for scales, _ in saved]
    for scales, values in saved:
        scales.restore(values)
    try:
        yield
    finally:
        for scales, values in current:
            scales.restore(values)


def _is_zero(scale: float | Tensor) -> bool:
    return not isinstance(scale, Tensor) and scale == 0.0


class LoRALayer(nn.Module):
    """A frozen base layer plus named low-rank adapters at runtime scales (see :class:`LoRALinear`,
    :class:`LoRAConv2d`). Subclasses give the adapter shapes and the forward."""

    def __init__(self, base: nn.Module, scales: LoRAScales):
        super().__init__()
        self.base = base
        self.scales = scales
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scaling: dict[str, float] = {}

    @property
    def weight(self) -> Tensor:  # some diffusers code reads .weight.dtype of projections
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_adapter(self, name: str, rank: int, alpha: float, *, seed: int = 0, module_name: str = "") -> None:
        """Add adapter ``name``: ``B = 0``, ``A`` from :func:`lora_init` (``seed``, ``module_name``, ``name``).

        On a meta-device base (sharded loading) the adapter stays on meta; the loader fills it with
        the same :func:`lora_init` draw (:func:`init_from_key`).
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        w = self.base.weight
        # fp32 master weights whatever the base dtype: a bf16 adapter would round away the tiny
        # AdamW updates of DMDR's learning rates (1e-6 .. 5e-9); forward casts to the input dtype.
        shape_a, shape_b = self.adapter_shapes(rank)
        if w.is_meta:
            a = torch.empty(shape_a, device="meta", dtype=torch.float32)
            b = torch.empty(shape_b, device="meta", dtype=torch.float32)
        else:
            a = lora_init(shape_a, seed=seed, module=module_name, adapter=name).to(w.device)
            b = torch.zeros(shape_b, device=w.device, dtype=torch.float32)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_scaling[name] = alpha / rank

    def _active(self) -> list[tuple[str, float | Tensor]]:
        out = []
        for name in self.lora_A:
            scale = self.scales.get(name)
            if not _is_zero(scale):
                out.append((name, scale * self.lora_scaling[name]))
        return out

    @staticmethod
    def _adapter(params: nn.ParameterDict, name: str, x: Tensor) -> Tensor:
        p = params[name]
        return p if p.dtype == x.dtype else p.to(x.dtype)  # differentiable cast: grads land in fp32

    def delta_weight(self, name: str) -> Tensor:  # pragma: no cover - abstract
        """``B A`` of adapter ``name`` in the base weight's shape (fp32, without the scales)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        ranks = {n: p.shape[0] for n, p in self.lora_A.items()}
        return f"adapters={ranks}"


class LoRALinear(LoRALayer):
    """A frozen ``nn.Linear`` plus named low-rank adapters ``B A`` at runtime scales."""

    def __init__(self, base: nn.Linear, scales: LoRAScales):
        super().__init__(base, scales)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def forward(self, x: Tensor) -> Tensor:
        active = self._active()
        if not active:
            return F.linear(x, self.base.weight, self.base.bias)
        name, scale = active[0]
        out = kernels.lora_linear(x, self.base.weight, self.base.bias, self._adapter(self.lora_A, name, x),
                                  self._adapter(self.lora_B, name, x), scale)
        for name, scale in active[1:]:  # two adapters live at once: rare, so unfused
            delta = F.linear(F.linear(x, self._adapter(self.lora_A, name, x)), self._adapter(self.lora_B, name, x))
            out = out + (expand_like(scale, delta) if isinstance(scale, Tensor) else scale) * delta
        return out

    def delta_weight(self, name: str) -> Tensor:
        return self.lora_B[name].float() @ self.lora_A[name].float()


class LoRAConv2d(LoRALayer):
    """A frozen ``nn.Conv2d`` plus named low-rank adapters at runtime scales (UNet convolutions).

    peft's layout: ``A`` is a convolution with the base's kernel, stride, padding and dilation into
    ``rank`` channels, ``B`` a 1x1 convolution back to ``out_channels``; ``lora_A`` is
    ``(rank, in, kh, kw)``, ``lora_B`` ``(out, rank, 1, 1)`` (peft's weight shapes and key names), and the
    merged update is ``B A`` as one ``(out, in, kh, kw)`` kernel. The output is
    ``base(x) + s alpha/r B(A(x))`` with ``s`` a float or a per-sample ``(B,)`` tensor broadcast over
    ``(B, C, H, W)``: the real, unconditional and fake scores still run as one batched forward.
    Grouped convolutions are not wrapped (no SDXL layer LoRA targets has groups).
    """

    def __init__(self, base: nn.Conv2d, scales: LoRAScales):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRA on a Conv2d needs groups=1 and zero padding")
        super().__init__(base, scales)

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:
        return self.base.out_channels

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = self.base.kernel_size
        return (rank, self.in_channels, kh, kw), (self.out_channels, rank, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        out = base(x)
        for name, scale in self._active():
            low = F.conv2d(x, self._adapter(self.lora_A, name, x), None, base.stride, base.padding, base.dilation)
            delta = F.conv2d(low, self._adapter(self.lora_B, name, x))
            out = out + (expand_like(scale, delta) if isinstance(scale, Tensor) else scale) * delta
        return out

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


_WRAPPERS: tuple[tuple[type[nn.Module], type[LoRALayer]], ...] = ((nn.Linear, LoRALinear), (nn.Conv2d, LoRAConv2d))
"""Which layer types take LoRA, and their wrappers."""


def _lora_seed(seed: int, module: str, adapter: str) -> int:
    """A 63-bit generator seed from the run seed, the module's qualified name and the adapter name."""
    digest = hashlib.blake2b(f"{seed}|{module}|{adapter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lora_init(shape: tuple[int, ...] | torch.Size, *, seed: int, module: str, adapter: str) -> Tensor:
    """The initial ``lora_A`` (``(rank, in_features)``, or ``(rank, in, kh, kw)`` for a convolution) of adapter
    ``adapter`` on layer ``module``: fp32, CPU.

    peft's init (kaiming-uniform, ``a = sqrt(5)``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) drawn
    from a generator seeded by ``(seed, module, adapter)``, so it depends on nothing else (no global
    RNG, no rank, no world size, no injection order). ``lora_B`` starts at zero.
    """
    g = torch.Generator().manual_seed(_lora_seed(seed, module, adapter))
    a = torch.empty(tuple(shape), dtype=torch.float32)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)


def init_from_key(key: str, shape: torch.Size, dtype: torch.dtype, seed: int = 0) -> Tensor | None:
    """The initial value of a LoRA parameter named by its weight-file key, or ``None`` if ``key`` is not one.

    ``key`` is ``<module>.lora_A.<adapter>`` or ``<module>.lora_B.<adapter>`` (a parameter name of
    a network with LoRA, without checkpoint wrappers); the same :func:`lora_init` draw as
    :meth:`LoRALinear.add_adapter`, for loaders that build adapters on the meta device.
    """
    parts = key.split(".")
    if len(parts) < 2 or parts[-2] not in ("lora_A", "lora_B"):
        return None
    module, kind, adapter = ".".join(parts[:-2]), parts[-2], parts[-1]
    if kind == "lora_B":
        return torch.zeros(shape, dtype=dtype)
    return lora_init(shape, seed=seed, module=module, adapter=adapter).to(dtype)


def _matches(qualified_name: str, targets: Iterable[str]) -> bool:
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], qualified_name):
                return True
        elif qualified_name == target or qualified_name.endswith("." + target):
            return True
    return False


def inject_lora(model: nn.Module, adapter: str, rank: int, alpha: float, targets: Iterable[str],
                scales: LoRAScales | None = None, *, seed: int = 0) -> LoRAScales:
    """Add adapter ``adapter`` to every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` whose name matches ``targets``.

    A target is a module-name suffix (``"attn.to_q"`` matches ``"blocks.3.attn.to_q"``) or a regex
    prefixed ``re:``. Linears already wrapped get one more adapter. Returns the model's scales
    object (created on first injection, found on the model's wrapped layers after that).

    ``lora_A`` is drawn by :func:`lora_init` from ``seed`` and the layer's qualified name in
    ``model``: inject into the diffusers network itself (``denoiser.net``), whose names are the keys
    of its weight files, so the sharded loader (prefix ``"net."``) draws the same values.

    Raises:
        ValueError: when no module matches (a typo in the targets must not train nothing).
    """
    targets = list(targets)
    existing = find_scales(model)
    if scales is None:
        scales = existing or LoRAScales()
    elif existing is not None and existing is not scales:
        raise ValueError("model already has LoRA layers bound to another LoRAScales")
    wrapped = 0
    for qualified, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            if _matches(qualified, targets):
                module.add_adapter(adapter, rank, alpha, seed=seed, module_name=qualified)
                wrapped += 1
            continue
        wrapper = next((w for base, w in _WRAPPERS if isinstance(module, base)), None)
        if wrapper is None or not _matches(qualified, targets):
            continue
        if qualified.endswith(".base") and isinstance(_parent(model, qualified), LoRALayer):
            continue
        layer = wrapper(module, scales)
        layer.add_adapter(adapter, rank, alpha, seed=seed, module_name=qualified)
        _set_submodule(model, qualified, layer)
        wrapped += 1
    if wrapped == 0:
        raise ValueError(f"LoRA targets {targets} match no nn.Linear or nn.Conv2d in {type(model).__name__}")
    return scales


def _parent(model: nn.Module, qualified: str) -> nn.Module:
    parent_name = qualified.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _set_submodule(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent = _parent(model, qualified)
    setattr(parent, qualified.rpartition(".")[2], new)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def find_scales(model: nn.Module) -> LoRAScales | None:
    for _, layer in lora_layers(model):
        return layer.scales
    return None


def lora_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The trainable parameters of one adapter, in a stable order."""
    params = []
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            params += [layer.lora_A[adapter], layer.lora_B[adapter]]
    if not params:
        raise ValueError(f"model has no LoRA adapter named {adapter!r}")
    return params


def lora_state_dict(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """One adapter's weights keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (peft naming)."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter in layer.lora_A:
            out[f"{name}.lora_A.weight"] = layer.lora_A[adapter].detach()
            out[f"{name}.lora_B.weight"] = layer.lora_B[adapter].detach()
    return out


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: str, scale: float = 1.0) -> None:
    """Fold ``scale * alpha/r * B A`` into the base weights (for export); the adapter is then zeroed."""
    for _, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        delta = layer.delta_weight(adapter) * (scale * layer.lora_scaling[adapter])
        layer.base.weight.add_(delta.to(layer.base.weight.dtype))
        layer.lora_B[adapter].zero_()
