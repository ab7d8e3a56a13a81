"""SD3 family adapter (SD3-Medium, SD3.5-Medium, SD3.5-Large): ``StableDiffusion3Pipeline`` folders.

Calling convention (diffusers' ``StableDiffusion3Pipeline``): the transformer gets the latents,
``timestep = 1000 * sigma`` and the text conditioning, and predicts ``noise - x0``, which the
``FlowMatchEulerDiscreteScheduler`` integrates as ``x + (sigma_next - sigma) * out``. That is our
velocity ``v = eps - x0`` at ``t = sigma`` as is: no sign flip, no time reversal.

Text: two CLIP text encoders (penultimate hidden states, concatenated along features, zero-padded
to T5's width; pooled projections concatenated) and T5 (last hidden state), concatenated along the
sequence: ``prompt_embeds`` is ``(B, 77 + max_sequence_length, 4096)`` and ``pooled_prompt_embeds``
``(B, 2048)`` for the real models. No attention masks, as in the pipeline.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.errors import ModelLoadError
from dmdr.models.base import Backbone, Conditioning, Denoiser
from dmdr.models.family import FamilySpec, LoraFormat, PlannerHooks
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, load_frozen_text_encoder
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.parameterization import FlowMatching

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",  # SD3.5-Medium's dual-attention blocks
)
"""The joint blocks' attention projections (image and context streams); the last block has no
``to_add_out`` and only SD3.5-Medium-style blocks have ``attn2``: suffixes that match nothing are fine."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")


class SD3Denoiser(Denoiser):
    """``SD3Transformer2DModel`` behind ``(x_t, t, cond) -> v`` with ``v = eps - x0``, ``t`` in ``[0, 1]``."""

    def __init__(self, net: nn.Module, t_min: float = 0.001):
        super().__init__(net, FlowMatching(t_min=t_min, timestep_scale=1000.0))

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        out = self.net(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=self.parameterization.model_timestep(t.float()),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        return list(self.net.transformer_blocks)

    def set_attention_backend(self, backend: str) -> None:
        """SD3's stock processor calls SDPA directly; swap in :class:`JointAttnDispatchProcessor` first."""
        self.net.set_attn_processor(JointAttnDispatchProcessor())
        super().set_attention_backend(backend)


class JointAttnDispatchProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``) through the attention dispatcher.

    diffusers 0.36-0.42 give ``SD3Transformer2DModel`` a processor that calls
    ``F.scaled_dot_product_attention`` itself, so ``set_attention_backend`` finds nothing to switch.
    This one computes the same projections, qk-norms and concatenation (image tokens, then context
    tokens) in the same order and hands ``(B, S, heads, head_dim)`` views to ``dispatch_attention_fn``.
    With the ``native`` backend the SDPA call receives the very tensors (same strides) the stock
    processor passes, so outputs are bitwise equal (tests/models/test_attention.py). ``attn2`` of
    SD3.5-Medium's dual-attention blocks (image tokens only) takes the same path.
    """

    _attention_backend = None  # set by ModelMixin.set_attention_backend
    _parallel_config = None

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: Tensor, norm: nn.Module | None) -> Tensor:  # (B, S, H*D) -> (B, H, S, D), normed per head
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = heads(attn.to_q(hidden_states), attn.norm_q)
        key = heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        # Under autocast with fp32 qk-norm weights the normed q, k come out fp32 while v is bf16: SDPA's
        # autocast rounds them the same way, flash-attn would refuse the mix. A no-op without autocast.
        query, key = query.to(value.dtype), key.to(value.dtype)
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return (out, context) if encoder_hidden_states is not None else out


class SD3TextEncoder(FrozenPromptEncoder):
    """The two CLIPs and T5 with ``StableDiffusion3Pipeline.encode_prompt``'s encoding (no CFG branch).

    :attr:`truncated` counts the prompts whose T5 tokens were cut to ``max_sequence_length``.

    Args:
        t5_dim: width of the T5 features; used for the all-zero T5 part when the folder has no T5
            (the pipeline's behaviour with ``text_encoder_3=None``).
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None,
                 text_encoder_3=None, max_sequence_length: int = 256, t5_dim: int = 4096):
        super().__init__(text_encoder, text_encoder_2, text_encoder_3)
        self.tokenizers = (tokenizer, tokenizer_2)
        self.encoders = (text_encoder, text_encoder_2)
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        self.max_sequence_length = max_sequence_length
        self.clip_max_length = tokenizer.model_max_length
        self.t5_dim = t5_dim

    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenize(self.tokenizers[index], prompts, self.clip_max_length).input_ids
        out = self.encoders[index](ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.encoders[0].dtype), out[0]

    def _t5(self, prompts: list[str]) -> Tensor:
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.t5_dim, device=self.device,
                               dtype=self.encoders[0].dtype)
        ids = self.tokenize(self.tokenizer_3, prompts, self.max_sequence_length, count_as="T5").input_ids
        return self.text_encoder_3(ids.to(self.device))[0].to(self.text_encoder_3.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, 77 + L, D_t5), "pooled_prompt_embeds": (B, D_pool)}``."""
        return self.embed(prompts)

    def embed(self, prompts: list[str]) -> Conditioning:
        """:meth:`encode` under the caller's grad mode (a teacher trained with its text encoders uses it)."""
        prompts = list(prompts)
        h1, p1 = self._clip(0, prompts)
        h2, p2 = self._clip(1, prompts)
        clip = torch.cat([h1, h2], dim=-1)
        t5 = self._t5(prompts)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_prompt_embeds": torch.cat([p1, p2], dim=-1)}


def text_components(folder: ModelFolder, options: LoadOptions) -> list[str]:
    """The CLIP pairs, and the T5 pair when the folder lists it (optional, but only as a pair)."""
    t5 = [n for n in T5_COMPONENTS if folder.declared(n)]
    if len(t5) == 1:  # T5 is optional (the pipeline then uses zeros), but only as a pair
        missing = next(n for n in T5_COMPONENTS if n not in t5)
        raise ModelLoadError(f"{folder.path}: model_index.json lists {t5[0]!r} without {missing!r}; "
                             "list both T5 components or neither")
    return [*TEXT_COMPONENTS, *t5]


def load_text_encoder(folder: ModelFolder, options: LoadOptions, t5_dim: int | None = None) -> SD3TextEncoder:
    """The frozen CLIPs and T5 of ``folder`` on ``options.device`` (no transformer or VAE weights read).

    ``t5_dim``: width of the all-zero T5 part of a folder without T5; default the transformer's
    ``joint_attention_dim`` (read from its config.json).
    """
    if t5_dim is None:
        t5_dim = int(folder.config("transformer")["joint_attention_dim"])
    return load_frozen_text_encoder(folder, options, text_components(folder, options), partial(
        SD3TextEncoder, max_sequence_length=options.max_sequence_length, t5_dim=t5_dim))


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The SD3 :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`).

    With ``options.defer_denoiser`` the transformer is built on the meta device and its weight
    folder goes to ``extras["denoiser_weights"]`` (see :func:`dmdr.models.load_backbone`).
    """
    transformer, vae, extras = load_transformer_and_vae(folder, options)
    text_encoder = None
    if options.load_text_encoder:
        text_encoder = load_text_encoder(folder, options, t5_dim=int(transformer.config.joint_attention_dim))
    codec = AutoencoderKLCodec(vae)
    teacher = SD3Denoiser(transformer, t_min=options.t_min)
    teacher.requires_grad_(False)
    extras["patch_size"] = int(transformer.config.patch_size)
    return Backbone(family="sd3", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=int(transformer.config.in_channels), vae_scale_factor=codec.scale_factor,
                    lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="sd3", pipeline_class="StableDiffusion3Pipeline", load=load, folder_text_components=text_components,
    load_text_encoder=load_text_encoder, denoiser_class=SD3Denoiser,
    lora_targets=LORA_TARGETS, no_cfg_guidance=1.0, lora_format=LoraFormat("transformer"),
    single_file_class="SD3Transformer2DModel",
    planner=PlannerHooks(flops="dmdr.planning.flops:sd3_network_flops",
                         activations="dmdr.planning.activations:sd3_activations",
                         text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                         extra_text_tokens=77, fixed_text_lengths={"text_encoder": 77, "text_encoder_2": 77}),
)
"""The diffusers network is the pipeline's own, so LoRA module names carry over to its loader unchanged."""
