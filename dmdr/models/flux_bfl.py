"""FLUX.1's and FLUX.2's LoRA in Black Forest Labs' module names: the layout kohya's sd-scripts write and ComfyUI
reads (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``; ``tools/convert_to_diffusers.py --lora
--lora-format kohya``).

BFL's checkpoint fuses what diffusers splits: a double block's ``img_attn.qkv`` is ``[to_q; to_k; to_v]`` stacked
by rows (``txt_attn.qkv`` the ``add_*_proj``), a single block's ``linear1`` is ``[to_q; to_k; to_v; proj_mlp]``
(diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` splits them so). A LoRA on the parts is one LoRA on
the fused linear, exactly: ``down`` stacks the parts' ``A`` (rank = the sum of their ranks) and ``up`` is block
diagonal, each part's ``B`` in its own rows and columns, zero rows for a part without an adapter (``proj_mlp`` under
dmdr's default targets). ``up @ down`` is then each part's ``B A`` in its rows and 0 elsewhere, which is what
ComfyUI adds to the fused weight; diffusers' kohya-FLUX converter
(``_convert_kohya_flux_lora_to_diffusers``) recognises the block-diagonal ``up`` and splits it back into the parts'
own ``(A, B)``.

FLUX.2 has the same double-block attention layout; its MLPs are ``ff.linear_in`` / ``linear_out``, its single
blocks are fused in diffusers too (``attn.to_qkv_mlp_proj`` is ``linear1``, ``attn.to_out`` is ``linear2``) and
its modulation is per network, not per block (diffusers' ``_convert_kohya_flux2_lora_to_diffusers``' table).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from dmdr.errors import ConfigError

DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
"""BFL's module in ``double_blocks.<i>`` -> diffusers' modules in ``transformer_blocks.<i>``, in BFL's row order."""
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
"""BFL's module in ``single_blocks.<i>`` -> diffusers' modules in ``single_transformer_blocks.<i>``."""
FLUX2_DOUBLE = {
    **{k: v for k, v in DOUBLE.items() if "_attn." in k},
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
FLUX2_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
SINGLE_MLP_RATIO = 4
"""``proj_mlp``'s width over the model width: diffusers builds every FLUX.1 single block with ``mlp_ratio`` 4.0 (the
rows of ``linear1`` a LoRA without a ``proj_mlp`` adapter leaves at zero)."""
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


Tables = tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]


def _bfl_module(name: str, tables: Tables) -> tuple[str, str]:
    """``(BFL module, diffusers part)`` of a diffusers module name of the transformer."""
    match = BLOCK.match(name)
    if match:
        kind, index, part = match.groups()
        table, bfl = (tables[0], "double_blocks") if kind == "transformer_blocks" else (tables[1], "single_blocks")
        for module, parts in table.items():
            if part in parts:
                return f"{bfl}.{index}.{module}", part
    raise ConfigError(f"--lora-format kohya: the module {name!r} has no BFL name in kohya's layout (it covers the "
                      "double and single blocks' linears); export --lora-format diffusers")


def bfl_lora_layers(layers: dict[str, tuple[Tensor, Tensor]], tables: Tables = (DOUBLE, SINGLE),
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """dmdr's ``{diffusers module: (A, B)}`` of a FLUX.1 transformer (``tables``: FLUX.2's with
    :func:`flux2_bfl_lora_layers`) -> ``{BFL module: (down, up)}`` with the same weight change on BFL's fused linears
    (module doc); fp32 in, fp32 out."""
    grouped: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for name, pair in layers.items():
        module, part = _bfl_module(name, tables)
        grouped.setdefault(module, {})[part] = pair
    out = {}
    for module, present in grouped.items():
        parts = tables[0 if module.startswith("double_blocks.") else 1][module.split(".", 2)[2]]
        a0 = next(iter(present.values()))[0]
        width = {p: present[p][1].shape[0] if p in present else
                 (SINGLE_MLP_RATIO if p == "proj_mlp" else 1) * a0.shape[1] for p in parts}
        ranks = {p: present[p][0].shape[0] for p in parts if p in present}
        down = torch.cat([present[p][0] for p in parts if p in present])
        up = torch.zeros(sum(width.values()), sum(ranks.values()), dtype=down.dtype)
        row = col = 0
        for p in parts:
            if p in present:
                up[row:row + width[p], col:col + ranks[p]] = present[p][1]
                col += ranks[p]
            row += width[p]
        out[module] = (down, up)
    return out


def flux2_bfl_lora_layers(layers: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`bfl_lora_layers` for a FLUX.2 transformer (``Flux2Transformer2DModel``)."""
    return bfl_lora_layers(layers, (FLUX2_DOUBLE, FLUX2_SINGLE))
