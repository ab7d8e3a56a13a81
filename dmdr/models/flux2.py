"""FLUX.2 [klein] family adapter: ``Flux2KleinPipeline`` folders (``Flux2Transformer2DModel``, a Qwen3 causal LM,
``AutoencoderKLFlux2``).

Calling convention, read from diffusers' ``Flux2KleinPipeline.__call__``:

* the denoiser's latent is the VAE latent ``z`` *patchified* 2x2 into channels (``4 C``, 128 for the real
  VAE) and normalised by the VAE's batch-norm running statistics: ``x = (patchify(z) - mean) / sqrt(var +
  eps)`` (the latent mean/std: :class:`Flux2Codec`). We keep ``x`` as ``(B, 4C, h, w)``; the transformer
  gets it flattened, ``(B, h w, 4C)``, with position ids ``(h w, 4)`` = ``(0, row, col, 0)`` and text ids
  ``(L, 4)`` = ``(0, 0, 0, l)``;
* ``timestep = (1000 sigma) / 1000`` (multiplied by 1000 inside), ``guidance = None`` (klein has no guidance
  embedding);
* it predicts ``noise - x0``, integrated as ``x + (sigma_next - sigma) out``: our velocity at ``t = sigma``.

Guidance: the klein *base* models are CFG teachers: ``v_u + w (v_c - v_u)`` with the negative prompt ``""``
encoded like any prompt (the pipeline's ``do_classifier_free_guidance``: ``guidance_scale > 1`` and not
``is_distilled``). The step-distilled klein (``is_distilled``) has no CFG and is not a teacher for DMDR: its
folder loads (a warning says so) but the real score's CFG then extrapolates a model never trained for it.

Text (``_get_qwen3_prompt_embeds``): each prompt through the chat template (one user message,
``add_generation_prompt=True, enable_thinking=False``), padded to ``max_sequence_length`` with the attention
mask, and the hidden states of layers 9, 18 and 27 stacked per token: ``(B, L, 3 D)``. The transformer gets
no mask (the pipeline passes none), so the padded positions count and ``max_sequence_length`` must match the
pipeline call's (the export records it).

Per-sample LoRA scales: the double-stream attention projections and the single-stream fused
``to_qkv_mlp_proj`` / ``to_out`` all see batch-first ``(B, L, D)`` inputs: one batched teacher call.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import Tensor, nn

from dmdr.models.base import Backbone, Conditioning, Denoiser
from dmdr.models.family import FamilySpec, LoraFormat, PlannerHooks
from dmdr.models.flux_bfl import flux2_bfl_lora_layers
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, chat_prompt, load_frozen_text_encoder
from dmdr.parameterization import FlowMatching

log = logging.getLogger("dmdr")

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_qkv_mlp_proj", "attn.to_out",
)
"""The double-stream blocks' attention projections and the single-stream blocks' fused projections (their
attention has no separate q/k/v: ``to_qkv_mlp_proj`` in, ``to_out`` out; the double blocks' ``to_out`` is a
``ModuleList`` and matches no layer)."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer")
HIDDEN_STATES_LAYERS = (9, 18, 27)
"""The Qwen3 layers whose hidden states the pipeline stacks (``text_encoder_out_layers``' default)."""


def patchify(z: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)``: ``Flux2KleinPipeline._patchify_latents``."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """The inverse of :func:`patchify`: ``Flux2KleinPipeline._unpatchify_latents``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def position_ids(rows: int, cols: int, device: torch.device) -> Tensor:
    """Image ids ``(rows * cols, 4)`` = ``(0, row, col, 0)``: ``Flux2KleinPipeline._prepare_latent_ids``."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, torch.arange(rows), torch.arange(cols), one).to(device)


def text_ids(length: int, device: torch.device) -> Tensor:
    """Text ids ``(length, 4)`` = ``(0, 0, 0, l)``: ``Flux2KleinPipeline._prepare_text_ids``."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, one, one, torch.arange(length)).to(device)


class Flux2Denoiser(Denoiser):
    """``Flux2Transformer2DModel`` behind ``(x_t, t, cond) -> v``, ``x_t`` the normalised patchified latent."""

    def __init__(self, net: nn.Module, t_min: float = 0.001):
        super().__init__(net, FlowMatching(t_min=t_min, timestep_scale=1000.0))

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        b, c, h, w = x_t.shape
        text = cond["prompt_embeds"].to(dtype)
        out = self.net(
            hidden_states=x_t.to(dtype).reshape(b, c, h * w).permute(0, 2, 1),
            encoder_hidden_states=text,
            timestep=self.parameterization.model_timestep(t.float()).to(dtype) / 1000,  # as the pipeline divides
            img_ids=position_ids(h, w, x_t.device),
            txt_ids=text_ids(text.shape[1], x_t.device),
            guidance=None,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w).to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        return [*self.net.transformer_blocks, *self.net.single_transformer_blocks]


class Flux2Codec:
    """``AutoencoderKLFlux2`` between the denoiser's normalised patchified latents and ``[0, 1]`` RGB."""

    def __init__(self, vae: nn.Module):
        self.vae = vae

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @property
    def scale_factor(self) -> int:
        """Pixels per denoiser latent cell (the VAE's downsampling times the 2x2 patch)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * 2

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels) * 4

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to RGB in ``[0, 1]`` (in the latents' dtype); differentiable (ReFL runs through it)."""
        x = latents.to(self.vae.dtype)
        mean, std = self._stats(x)
        image = self.vae.decode(unpatchify(x * std + mean), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """RGB in ``[0, 1]`` to denoiser latents: the posterior mode (a sample when given ``generator``)."""
        dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1, return_dict=False)[0]
        z = patchify(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._stats(z)
        return ((z - mean) / std).to(images.dtype)

    def to(self, device: torch.device | str) -> Flux2Codec:
        self.vae.to(device)
        return self


class Flux2TextEncoder(FrozenPromptEncoder):
    """Qwen3 with ``Flux2KleinPipeline.encode_prompt``'s encoding (see the module doc)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512):
        super().__init__(text_encoder)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length

    def format(self, prompt: str) -> str:
        return chat_prompt(self.tokenizer, prompt, thinking=False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, max_sequence_length, 3 D)}`` (padded positions included, as the pipeline)."""
        inputs = self.tokenize(self.tokenizer, [self.format(p) for p in prompts], self.max_sequence_length,
                               count_as="Qwen")
        out = self.text_encoder(input_ids=inputs.input_ids.to(self.device),
                                attention_mask=inputs.attention_mask.to(self.device), output_hidden_states=True,
                                use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in HIDDEN_STATES_LAYERS], dim=2)  # (B, L, 3, D)
        return {"prompt_embeds": hidden.reshape(*hidden.shape[:2], -1).to(self.text_encoder.dtype)}


def load_text_encoder(folder: ModelFolder, options: LoadOptions) -> Flux2TextEncoder:
    """The frozen Qwen3 and tokenizer of ``folder`` on ``options.device`` (nothing else read)."""
    return load_frozen_text_encoder(folder, options, TEXT_COMPONENTS, partial(
        Flux2TextEncoder, max_sequence_length=options.max_sequence_length))


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The FLUX.2 [klein] :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`)."""
    if folder.index.get("is_distilled"):
        log.warning("%s is a step-distilled FLUX.2 [klein] (is_distilled: true): it was not trained for CFG; "
                    "distil the base model (is_distilled: false)", folder.path)
    transformer, vae, extras = load_transformer_and_vae(folder, options)
    text_encoder = load_text_encoder(folder, options) if options.load_text_encoder else None
    codec = Flux2Codec(vae)
    teacher = Flux2Denoiser(transformer, t_min=options.t_min)
    teacher.requires_grad_(False)
    extras["patch_size"] = 1  # one token per (already patchified) latent cell
    return Backbone(family="flux2", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=int(transformer.config.in_channels), vae_scale_factor=codec.scale_factor,
                    lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="flux2", pipeline_class="Flux2KleinPipeline", load=load, text_component_names=TEXT_COMPONENTS,
    load_text_encoder=load_text_encoder, denoiser_class=Flux2Denoiser,
    lora_targets=LORA_TARGETS, no_cfg_guidance=1.0,
    lora_format=LoraFormat("transformer", kohya_modules=flux2_bfl_lora_layers),
    single_file_class="Flux2Transformer2DModel", make_codec=Flux2Codec,
    planner=PlannerHooks(flops="dmdr.planning.flops:flux2_network_flops",
                         activations="dmdr.planning.activations:flux2_activations",
                         text_encoders=("text_encoder",), mlp_ratio=(3, 1), latent_patch=2),
)
"""CFG off at ``guidance_scale`` <= 1 (the pipeline guides iff > 1 and not ``is_distilled``). The kohya layout
names BFL's modules (:mod:`dmdr.models.flux_bfl`). The planner's
``latent_patch`` 2: the VAE's 8 px cells are patchified 2x2 into one token (the transformer's ``patch_size`` is 1)."""
