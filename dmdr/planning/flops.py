"""FLOPs of a DMDR iteration, from the model definitions.

A denoiser block's forward is counted from its modules: every linear (``2 x rows x in x out``; rows
are the tokens of its stream, or the samples for the per-sample modulation linears), every active
LoRA adapter (``2 x rows x rank x (in + out)``), and attention (``4 x T^2 x width`` per sample: ``QK^T``
and ``PV``). That is what ``torch.utils.flop_counter`` counts (matmuls and SDPA; norms and elementwise
ops are free), and tests/planning checks one block against it within 5%.

Backward: each linear's input gradient costs its forward again, its weight gradient once more when
the weight trains; attention's backward is 2.5x its forward (flash recomputes the scores; torch's
counter uses the same 5 matmuls). Activation checkpointing adds one forward of the wrapped blocks.

The VAE decoder and the reward models are counted by running them on the meta device under
``FlopCounterMode`` (:func:`meta_flops`); text encoders as ``2 x parameters x tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dmdr.models.lora import LoRALinear
from dmdr.planning.activations import Tokens, flux_single_rows, qwenimage_rows, sd3_rows, zimage_rows


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs of one block per sample, split by what backward does with them."""

    frozen_linear: int
    """Base linears (weights frozen in LoRA mode)."""
    lora: int
    """Active LoRA adapters."""
    attention: int

    @property
    def forward(self) -> int:
        return self.frozen_linear + self.lora + self.attention

    def backward(self, mode: str) -> int:
        """Backward FLOPs: ``full`` trains the base weights, ``lora`` only the adapters."""
        weight_grads = self.frozen_linear if mode == "full" else 0
        return self.frozen_linear + weight_grads + 2 * self.lora + int(2.5 * self.attention)


def _linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear computation: LoRA-wrapped linears once (their base inside)."""
    out = []
    wrapped = set()
    for name, m in block.named_modules():
        if isinstance(m, LoRALinear):
            out.append((name, m))
            wrapped.add(id(m.base))
        elif isinstance(m, nn.Linear) and id(m) not in wrapped:
            out.append((name, m))
    return out


def _linear_flops(rows: int, m: nn.Module, adapters: tuple[str, ...]) -> tuple[int, int]:
    base = m.base if isinstance(m, LoRALinear) else m
    flops = 2 * rows * base.in_features * base.out_features
    lora = 0
    if isinstance(m, LoRALinear):
        for name in adapters:
            if name in m.lora_A:
                r = m.lora_A[name].shape[0]
                lora += 2 * rows * r * (base.in_features + base.out_features)
    return flops, lora


def _block_linear_flops(block: nn.Module, rows: Callable[[str], int], adapters: tuple[str, ...]) -> tuple[int, int]:
    """(base, LoRA) forward FLOPs per sample of every linear in ``block``; ``rows(name)``: the tokens it sees."""
    base = lora = 0
    for name, mod in _linears(block):
        f, lo = _linear_flops(rows(name), mod, adapters)
        base, lora = base + f, lora + lo
    return base, lora


def sd3_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a ``JointTransformerBlock`` with ``adapters`` active."""
    n = tokens.image
    base, lora = _block_linear_flops(block, lambda name: sd3_rows(name, tokens), adapters)
    d = block.norm2.normalized_shape[0]
    attention = 4 * (n + tokens.text) ** 2 * d
    if block.attn2 is not None:
        attention += 4 * n * n * d
    return BlockFlops(base, lora, attention)


def zimage_block_flops(block: nn.Module, tokens: int, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a ``ZImageTransformerBlock`` over ``tokens`` tokens."""
    base, lora = _block_linear_flops(block, lambda name: zimage_rows(name, tokens), adapters)
    return BlockFlops(base, lora, 4 * tokens * tokens * block.dim)


def qwenimage_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a ``QwenImageTransformerBlock`` (joint attention over image + text tokens)."""
    base, lora = _block_linear_flops(block, lambda name: qwenimage_rows(name, tokens), adapters)
    return BlockFlops(base, lora, 4 * (tokens.image + tokens.text) ** 2 * block.dim)


def flux_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a FLUX.1 double-stream ``FluxTransformerBlock`` (SD3's joint block layout)."""
    base, lora = _block_linear_flops(block, lambda name: sd3_rows(name, tokens), adapters)
    return BlockFlops(base, lora, 4 * (tokens.image + tokens.text) ** 2 * block.norm2.normalized_shape[0])


def flux_single_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a FLUX.1 ``FluxSingleTransformerBlock`` over the joined text + image tokens."""
    base, lora = _block_linear_flops(block, lambda name: flux_single_rows(name, tokens), adapters)
    return BlockFlops(base, lora, 4 * (tokens.image + tokens.text) ** 2 * block.proj_mlp.in_features)


def flux_network_flops(denoiser: nn.Module, tokens: Tokens, adapters: tuple[str, ...]) -> list[BlockFlops]:
    net = denoiser.net
    return ([flux_block_flops(b, tokens, adapters) for b in net.transformer_blocks]
            + [flux_single_block_flops(b, tokens, adapters) for b in net.single_transformer_blocks])


def flux2_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a FLUX.2 ``Flux2TransformerBlock`` (no per-block modulation linears: the
    network computes them once; every linear sees its stream's tokens, as SD3's joint block)."""
    base, lora = _block_linear_flops(block, lambda name: sd3_rows(name, tokens), adapters)
    return BlockFlops(base, lora, 4 * (tokens.image + tokens.text) ** 2 * block.attn.inner_dim)


def flux2_single_block_flops(block: nn.Module, tokens: Tokens, adapters: tuple[str, ...] = ()) -> BlockFlops:
    """Forward FLOPs per sample of a FLUX.2 ``Flux2SingleTransformerBlock`` (fused q/k/v + MLP in, fused out)."""
    base, lora = _block_linear_flops(block, lambda _: tokens.image + tokens.text, adapters)
    return BlockFlops(base, lora, 4 * (tokens.image + tokens.text) ** 2 * block.attn.inner_dim)


def flux2_network_flops(denoiser: nn.Module, tokens: Tokens, adapters: tuple[str, ...]) -> list[BlockFlops]:
    net = denoiser.net
    return ([flux2_block_flops(b, tokens, adapters) for b in net.transformer_blocks]
            + [flux2_single_block_flops(b, tokens, adapters) for b in net.single_transformer_blocks])


def sd3_network_flops(denoiser: nn.Module, tokens: Tokens, adapters: tuple[str, ...]) -> list[BlockFlops]:
    return [sd3_block_flops(b, tokens, adapters) for b in denoiser.net.transformer_blocks]


def zimage_network_flops(denoiser: nn.Module, tokens: Tokens, adapters: tuple[str, ...]) -> list[BlockFlops]:
    net = denoiser.net
    n, m = -(-tokens.image // 32) * 32, -(-tokens.text // 32) * 32
    out = [zimage_block_flops(b, n, adapters) for b in net.noise_refiner]
    out += [zimage_block_flops(b, m, adapters) for b in net.context_refiner]
    return out + [zimage_block_flops(b, n + m, adapters) for b in net.layers]



def qwenimage_network_flops(denoiser: nn.Module, tokens: Tokens, adapters: tuple[str, ...]) -> list[BlockFlops]:
    return [qwenimage_block_flops(b, tokens, adapters) for b in denoiser.net.transformer_blocks]


def meta_flops(fn: Callable[[], torch.Tensor], backward: bool = False) -> int:
    """FLOPs torch's counter sees while ``fn`` runs (on meta tensors: shapes only), optionally with the
    backward of ``fn()``'s sum."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()
