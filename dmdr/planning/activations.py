"""Activation memory: what autograd saves per denoiser block, from the architecture, and per frozen network.

Transformer blocks are counted from their shape (tokens, width, heads, MLP width, dtype) op by op:
each term below is a tensor the op saves for backward (LayerNorm/RMSNorm inputs, the projections'
inputs, SDPA's q, k, v, output and log-sum-exp, the MLP's hidden activations, ...). Which ones are
saved depends on what needs a gradient:

* ``full``: the block's weights train (full fine-tune generator): every linear saves its input and
  every modulation product both factors;
* ``lora``: only the LoRA adapters on the attention projections train (critic steps, LoRA generator):
  frozen linears save nothing of their input, modulation gates need no gradient, and the first block
  of each stream saves nothing before its first adapter (its inputs need no gradient).

Attention is assumed memory-efficient (flash / efficient SDPA: no ``T x T`` matrix is kept), as on
GPUs and in torch's CPU flash kernel. Under activation checkpointing a wrapped block keeps only its
inputs; the block being recomputed in backward holds its full set once more.

The VAE decoder and the reward ViTs (ReFL's backward runs through both) are counted by running them
on the meta device under a saved-tensor hook (:func:`saved_bytes_on_meta`): exact shapes, no memory.

Grounded in tests/planning against autograd's saved tensors of the tiny models (within 25%).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dmdr.models.lora import LoRALinear

F32 = 4


@dataclass(frozen=True)
class Tokens:
    """Sequence lengths per sample: image tokens ``image``, text tokens ``text``."""

    image: int
    text: int


def _rms_in(e: int) -> int:
    """Bytes per element an RMSNorm (diffusers') saves of its input: the fp32 copy it squares, plus the
    input itself when that is not fp32 already (``x * rsqrt(var)`` keeps it)."""
    return F32 + (e if e != F32 else 0)


def sd3_rows(name: str, tokens: Tokens) -> int:
    """Rows per sample a linear of a ``JointTransformerBlock`` sees (its stream's tokens, or 1 for adaLN)."""
    if name.startswith(("norm1.", "norm1_context.")):
        return 1
    if name.startswith(("attn.add_", "attn.to_add_out", "ff_context.")):
        return tokens.text
    return tokens.image


def flux_single_rows(name: str, tokens: Tokens) -> int:
    """Rows per sample of a linear of a FLUX.1 single-stream block (the joined tokens, or 1 for adaLN)."""
    return 1 if name.startswith("norm.") else tokens.image + tokens.text


def zimage_rows(name: str, tokens: int) -> int:
    return 1 if name.startswith("adaLN_modulation") else tokens


def lora_intermediates(block: nn.Module, rows: Callable[[str], int], adapter: str | None, e: int) -> int:
    """The ``x A^T`` (rows x rank) each active adapter saves for ``B``'s gradient."""
    if adapter is None:
        return 0
    return sum(rows(name) * m.lora_A[adapter].shape[0] * e for name, m in block.named_modules()
               if isinstance(m, LoRALinear) and adapter in m.lora_A)


def _ln_stats(tokens: int) -> int:
    return 2 * F32 * tokens  # LayerNorm's mean and rstd


def _attention(tokens: int, width: int, heads: int, e: int) -> int:
    """SDPA (flash / efficient): q, k, v, output, and the fp32 log-sum-exp; plus the output projection's
    input (the output transposed back, a copy)."""
    return 5 * tokens * width * e + heads * tokens * F32


def sd3_block_bytes(block: nn.Module, tokens: Tokens, e: int, mode: str, first: bool = False,
                    adapter: str | None = None) -> int:
    """Saved bytes per sample of one ``JointTransformerBlock`` (SD3 / SD3.5) in ``mode`` (``full``/``lora``),
    ``adapter`` the active LoRA adapter."""
    full = mode == "full"
    d = block.norm2.normalized_shape[0]
    heads = block.attn.heads
    hidden = block.ff.net[2].in_features
    qk = block.attn.norm_q is not None
    n, m = tokens.image, tokens.text

    def qk_norm(t: int) -> int:
        return 2 * t * d * (_rms_in(e) + (e if full else 0)) if qk else 0

    def stream_pre(t: int) -> int:
        """Norm1 (LayerNorm + modulation) and the projections' shared input."""
        out = 0 if (first and not full) else t * d * e + _ln_stats(t)
        out += t * d * e * (1 if full else 0)  # the normalised input, for the modulation's gradient
        return out + t * d * e + qk_norm(t)  # the q/k/v (LoRA) projections' input

    def stream_post(t: int) -> int:
        """Gate, norm2 + modulation, the MLP, gate."""
        out = t * d * e * (1 if full else 0)  # attention output, for the gate's gradient
        out += t * d * e + _ln_stats(t)  # norm2's input
        out += t * d * e * (2 if full else 0)  # normalised input (modulation), MLP input
        out += t * hidden * e * (2 if full else 1)  # GELU input (and output, for fc2's weight)
        return out + t * d * e * (1 if full else 0)  # MLP output, for the gate's gradient

    total = stream_pre(n) + stream_post(n) + stream_pre(m) + _attention(n + m, d, heads, e)
    if not getattr(block, "context_pre_only", False):  # FLUX.1's double blocks: never pre-only
        total += stream_post(m)
    if getattr(block, "attn2", None) is not None:  # SD3.5-Medium's dual attention on the image stream
        total += n * d * e + qk_norm(n) + _attention(n, d, heads, e) + n * d * e * (1 if full else 0)
    return total + lora_intermediates(block, lambda name: sd3_rows(name, tokens), adapter, e)


def zimage_block_bytes(block: nn.Module, tokens: int, e: int, mode: str, first: bool = False,
                       adapter: str | None = None) -> int:
    """Saved bytes per sample of one ``ZImageTransformerBlock`` over ``tokens`` tokens."""
    full = mode == "full"
    d = block.dim
    heads = block.attention.heads
    hidden = block.feed_forward.w2.in_features
    mod = 1 if block.modulation else 0
    t = tokens

    def rms(needs_input: bool = True) -> int:
        return (t * d * _rms_in(e) if needs_input else 0) + t * d * e * (1 if full else 0)

    out = rms(not (first and not full)) + t * d * e * mod * (1 if full else 0)  # attention_norm1 (x scale)
    out += t * d * e  # q/k/v projections' input
    if block.attention.norm_q is not None:  # per-head RMSNorm of q and k
        out += 2 * t * d * (_rms_in(e) + (e if full else 0))
    out += _attention(t, d, heads, e)
    out += rms() + t * d * e * mod * (1 if full else 0)  # attention_norm2 (x gate)
    out += rms() + t * d * e * mod * (1 if full else 0)  # ffn_norm1 (x scale)
    out += t * d * e * (1 if full else 0)  # w1/w3 input
    out += t * hidden * e * (4 if full else 3)  # silu input, silu output, w3 output (and w2 input)
    out += rms() + t * d * e * mod * (1 if full else 0)  # ffn_norm2 (x gate)
    return out + lora_intermediates(block, lambda name: zimage_rows(name, t), adapter, e)


def qwenimage_rows(name: str, tokens: Tokens) -> int:
    """Rows per sample a linear of a ``QwenImageTransformerBlock`` sees (its stream's tokens, or 1 for the
    modulation)."""
    if name.startswith(("img_mod.", "txt_mod.")):
        return 1
    if name.startswith(("attn.add_", "attn.to_add_out", "txt_mlp.")):
        return tokens.text
    return tokens.image


def qwenimage_block_bytes(block: nn.Module, tokens: Tokens, e: int, mode: str, first: bool = False,
                          adapter: str | None = None) -> int:
    """Saved bytes per sample of one ``QwenImageTransformerBlock``: two streams (image, text) of the same
    layout, LayerNorm + modulation, per-head RMS qk-norm, RoPE (it saves only its constant frequencies),
    one joint attention, gated residuals, a GELU MLP each; both streams keep their MLP (no context-pre-only)."""
    full = mode == "full"
    d = block.dim
    heads = block.attn.heads
    hidden = block.img_mlp.net[2].in_features
    qk = block.attn.norm_q is not None

    def stream(t: int) -> int:
        out = 0 if (first and not full) else t * d * e + _ln_stats(t)  # norm1's input
        out += t * d * e * (1 if full else 0)  # the normalised input, for the modulation's gradient
        out += t * d * e  # the q/k/v (LoRA) projections' input
        out += 2 * t * d * (_rms_in(e) + (e if full else 0)) if qk else 0
        out += t * d * e * (1 if full else 0)  # attention output, for the gate's gradient
        out += t * d * e + _ln_stats(t)  # norm2's input
        out += t * d * e * (2 if full else 0)  # normalised input (modulation), MLP input
        out += t * hidden * e * (2 if full else 1)  # GELU input (and output, for fc2's weight)
        return out + t * d * e * (1 if full else 0)  # MLP output, for the gate's gradient

    n, m = tokens.image, tokens.text
    total = stream(n) + stream(m) + _attention(n + m, d, heads, e)
    return total + lora_intermediates(block, lambda name: qwenimage_rows(name, tokens), adapter, e)


def flux_single_block_bytes(block: nn.Module, tokens: Tokens, e: int, mode: str, first: bool = False,
                            adapter: str | None = None) -> int:
    """Saved bytes per sample of one FLUX.1 ``FluxSingleTransformerBlock`` over the joined tokens: adaLN LayerNorm,
    the shared input of q/k/v and the MLP, qk-norm, attention, the MLP's GELU, and (training the weights) the
    joined ``[attention, MLP]`` input of ``proj_out`` and the gate's operands."""
    full = mode == "full"
    d = block.proj_mlp.in_features
    hidden = block.proj_mlp.out_features
    heads = block.attn.heads
    t = tokens.image + tokens.text
    out = 0 if (first and not full) else t * d * e + _ln_stats(t)  # the norm's input
    out += t * d * e * (2 if full else 1)  # normalised input (modulation), the projections' shared input
    out += 2 * t * d * (_rms_in(e) + (e if full else 0))  # per-head RMSNorm of q and k
    out += _attention(t, d, heads, e) - t * d * e  # no output projection of its own
    out += t * hidden * e  # the GELU's input
    if full:
        out += t * (d + hidden) * e + t * d * e  # proj_out's input, its output for the gate's gradient
    return out + lora_intermediates(block, lambda name: flux_single_rows(name, tokens), adapter, e)


def flux_activations(denoiser: nn.Module, tokens: Tokens, e: int, mode: str,
                     adapter: str | None = None) -> BlockActivations:
    """FLUX.1: the double-stream blocks (SD3's joint block accounting) then the single-stream blocks."""
    net = denoiser.net
    n, m = tokens.image, tokens.text
    d = net.inner_dim
    double = [sd3_block_bytes(b, tokens, e, mode, first=(i == 0), adapter=adapter)
              for i, b in enumerate(net.transformer_blocks)]
    single = [flux_single_block_bytes(b, tokens, e, mode, adapter=adapter) for b in net.single_transformer_blocks]
    inputs = [(n + m) * d * e] * (len(double) + len(single))
    root = n * d * e + _ln_stats(n)  # the output norm's input
    if mode == "full":
        root += 2 * n * d * e + m * int(net.config.joint_attention_dim) * e
    return BlockActivations(double + single, inputs, root)


def _torch_rms_in(full: bool) -> int:
    """Bytes per element ``torch.nn.RMSNorm`` (FLUX.2's qk-norm; torch's composite kernel) saves: its input upcast
    to fp32 (the input itself when fp32 already) and, training its weight, the fp32 normalised input."""
    return F32 * (2 if full else 1)


def _swiglu(t: int, hidden: int, e: int, full: bool) -> int:
    """FLUX.2's SwiGLU MLP after its fused input projection: the projection's output (``2 hidden`` wide, whose
    halves SiLU and the product save), SiLU's output, and (training the weights) the output projection's input."""
    return t * hidden * e * (4 if full else 3)


def flux2_block_bytes(block: nn.Module, tokens: Tokens, e: int, mode: str, first: bool = False,
                      adapter: str | None = None) -> int:
    """Saved bytes per sample of one FLUX.2 ``Flux2TransformerBlock``: per stream, LayerNorm (no affine) + the
    shared modulation (computed once per network, outside the block), the q/k/v projections' input, per-head
    ``torch.nn.RMSNorm`` qk-norm, gated residuals and a SwiGLU MLP; one joint attention (text first)."""
    full = mode == "full"
    d = block.norm2.normalized_shape[0]
    heads = block.attn.heads
    hidden = block.ff.linear_out.in_features

    def stream(t: int) -> int:
        out = 0 if (first and not full) else t * d * e + _ln_stats(t)  # norm1's input
        out += t * d * e * (1 if full else 0)  # the normalised input, for the modulation's gradient
        out += t * d * e  # the q/k/v (LoRA) projections' input
        out += 2 * t * d * _torch_rms_in(full)  # qk-norm
        out += t * d * e * (1 if full else 0)  # attention output, for the gate's gradient
        out += t * d * e + _ln_stats(t)  # norm2's input
        out += t * d * e * (2 if full else 0)  # normalised input (modulation), linear_in's input
        out += _swiglu(t, hidden, e, full)
        return out + t * d * e * (1 if full else 0)  # MLP output, for the gate's gradient

    n, m = tokens.image, tokens.text
    total = stream(n) + stream(m) + _attention(n + m, d, heads, e)
    return total + lora_intermediates(block, lambda name: sd3_rows(name, tokens), adapter, e)


def flux2_single_block_bytes(block: nn.Module, tokens: Tokens, e: int, mode: str, first: bool = False,
                             adapter: str | None = None) -> int:
    """Saved bytes per sample of one FLUX.2 ``Flux2SingleTransformerBlock`` over the joined tokens: LayerNorm +
    modulation, the fused ``to_qkv_mlp_proj`` (its input, and its output, which qk-norm, SDPA's ``v`` and the
    SwiGLU keep alive as views), attention, the SwiGLU, and the joined ``[attention, MLP]`` input of ``to_out``
    (a LoRA target, so kept in both modes)."""
    full = mode == "full"
    attn = block.attn
    d, hidden, heads = attn.inner_dim, attn.mlp_hidden_dim, attn.heads
    t = tokens.image + tokens.text
    out = 0 if (first and not full) else t * d * e + _ln_stats(t)  # the norm's input
    out += t * d * e * (2 if full else 1)  # normalised input (modulation), the fused projection's input
    out += t * (3 * d + 2 * hidden) * e  # the fused projection's output (q, k, v and the MLP's two halves)
    out += 2 * t * d * (F32 if e != F32 else 0) + (2 * t * d * F32 if full else 0)  # qk-norm's fp32 copies
    out += 2 * t * d * e + t * d * e + heads * t * F32  # SDPA: q and k after RoPE, the output, log-sum-exp
    out += t * hidden * e  # SiLU's output
    out += t * (d + hidden) * e  # to_out's input
    if full:
        out += t * d * e  # to_out's output, for the gate's gradient
    return out + lora_intermediates(block, lambda name: flux_single_rows(name, tokens), adapter, e)


def flux2_activations(denoiser: nn.Module, tokens: Tokens, e: int, mode: str,
                      adapter: str | None = None) -> BlockActivations:
    """FLUX.2 [klein]: the double-stream blocks, then the single-stream blocks over the joined tokens. RoPE's
    cos / sin tables (a few MB, shared by every block and sample) are left out."""
    net = denoiser.net
    n, m = tokens.image, tokens.text
    d = net.inner_dim
    double = [flux2_block_bytes(b, tokens, e, mode, first=(i == 0), adapter=adapter)
              for i, b in enumerate(net.transformer_blocks)]
    single = [flux2_single_block_bytes(b, tokens, e, mode, adapter=adapter) for b in net.single_transformer_blocks]
    inputs = [(n + m) * d * e] * (len(double) + len(single))
    root = n * d * e + _ln_stats(n)  # the output norm's input
    if mode == "full":  # normalised input, proj_out's input, and the two embedders' inputs
        root += 2 * n * d * e + m * int(net.config.joint_attention_dim) * e + n * int(net.config.in_channels) * e
    return BlockActivations(double + single, inputs, root)


@dataclass(frozen=True)
class BlockActivations:
    """Saved bytes per sample of each block, and of each block's inputs (what checkpointing keeps)."""

    blocks: list[int]
    inputs: list[int]
    root: int


def sd3_activations(denoiser: nn.Module, tokens: Tokens, e: int, mode: str,
                    adapter: str | None = None) -> BlockActivations:
    net = denoiser.net
    blocks = list(net.transformer_blocks)
    d = blocks[0].norm2.normalized_shape[0]
    n, m = tokens.image, tokens.text
    per = [sd3_block_bytes(b, tokens, e, mode, first=(i == 0), adapter=adapter) for i, b in enumerate(blocks)]
    inputs = [(n + m) * d * e] * len(blocks)
    # Root: the output norm saves its input (and, training the weights, the normalised input and the
    # output projection's input, and the context embedder's input).
    root = n * d * e + _ln_stats(n)
    if mode == "full":
        root += 2 * n * d * e + m * int(net.config.joint_attention_dim) * e
    return BlockActivations(per, inputs, root)


def zimage_activations(denoiser: nn.Module, tokens: Tokens, e: int, mode: str,
                       adapter: str | None = None) -> BlockActivations:
    net = denoiser.net
    n, m = _round_up(tokens.image, 32), _round_up(tokens.text, 32)  # the net pads both to multiples of 32
    d = net.dim
    refiners = [(b, n, i == 0) for i, b in enumerate(net.noise_refiner)]
    refiners += [(b, m, i == 0) for i, b in enumerate(net.context_refiner)]
    main = [(b, n + m, False) for b in net.layers]
    per = [zimage_block_bytes(b, t, e, mode, first, adapter) for b, t, first in [*refiners, *main]]
    inputs = [t * d * e for _, t, _ in [*refiners, *main]]
    root = n * d * e + _ln_stats(n)  # final LayerNorm input
    if mode == "full":
        root += 2 * n * d * e
    return BlockActivations(per, inputs, root)


def qwenimage_activations(denoiser: nn.Module, tokens: Tokens, e: int, mode: str,
                          adapter: str | None = None) -> BlockActivations:
    net = denoiser.net
    blocks = list(net.transformer_blocks)
    d = blocks[0].dim
    n, m = tokens.image, tokens.text
    per = [qwenimage_block_bytes(b, tokens, e, mode, first=(i == 0), adapter=adapter) for i, b in enumerate(blocks)]
    inputs = [(n + m) * d * e] * len(blocks)
    # Root: the output norm saves its input (training the weights also the normalised input, the output
    # projection's input and the text embedder's RMSNorm and linear inputs).
    root = n * d * e + _ln_stats(n)
    if mode == "full":
        text_dim = int(net.config.joint_attention_dim)
        root += 2 * n * d * e + m * text_dim * (_rms_in(e) + e)
    return BlockActivations(per, inputs, root)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k



def network_activation_bytes(acts: BlockActivations, batch: int, ac: str, every: int = 2) -> int:
    """Peak saved bytes of one forward with grad at ``batch`` under activation-checkpointing policy ``ac``.

    ``none``: every block's set. ``full``: each block's inputs, plus one block's full set (the one being
    recomputed in backward). ``every_k``: blocks ``0, k, 2k, ...`` checkpointed (as
    :func:`dmdr.distributed.parallelize.apply_activation_checkpointing` wraps them), the others whole.
    """
    if ac == "none":
        kept = sum(acts.blocks)
        recompute = 0
    else:
        wrapped = [i for i in range(len(acts.blocks)) if ac == "full" or i % every == 0]
        kept = sum(acts.inputs[i] if i in wrapped else b for i, b in enumerate(acts.blocks))
        recompute = max(acts.blocks[i] for i in wrapped) if wrapped else 0
    return batch * (kept + recompute + acts.root)


def no_grad_block_peak(acts_full_width: int, tokens: int, hidden: int, e: int, batch: int) -> int:
    """Working memory of a block run without grad (backward simulation, the teacher's 3x-batch pass):
    the residual stream, q/k/v/output, and the MLP's hidden activations alive at once."""
    return batch * tokens * (5 * acts_full_width + 2 * hidden) * e


def saved_bytes_on_meta(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves while ``fn`` runs on meta tensors (each saved base tensor counted once).

    Parameters and buffers are not activations: tensors created before the call are excluded.
    """
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or getattr(base, "_dmdr_preexisting", False):
            return t
        if id(base) not in seen:
            keep.append(base)
            seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def per_sample(total: int, batch: int) -> int:
    return math.ceil(total / batch)
