"""FLUX.1 family adapter (FLUX.1-dev, FLUX.1-schnell): ``FluxPipeline`` folders (``FluxTransformer2DModel``,
CLIP-L + T5-XXL, the 16-channel FLUX VAE).

Calling convention, read from diffusers' ``FluxPipeline.__call__``:

* latents ``(B, C, H, W)`` are *packed* into 2x2 patches, ``(B, H/2 * W/2, 4C)`` (channel-major inside a
  patch), with image position ids ``(H/2 * W/2, 3)`` = ``(0, row, col)`` and text position ids all zero
  ``(L, 3)``: :func:`pack_latents`, :func:`latent_ids`;
* the transformer gets ``timestep = (1000 sigma) / 1000`` (it multiplies by 1000 inside) and, when its config
  has ``guidance_embeds`` (FLUX.1-dev), ``guidance`` ``(B,)``: the guidance scale as an input embedding;
* it predicts ``noise - x0``, integrated as ``x + (sigma_next - sigma) out``: our velocity at ``t = sigma``.

Guidance: FLUX.1-dev is guidance-distilled (no true CFG). The real and fake scores follow
:mod:`dmdr.guidance` (docs/guidance.md): real at embedding ``w``, fake and generator at
``dmd.generator_guidance``; a conditioning's ``guidance`` entry (per sample) overrides the network's default.
FLUX.1-schnell (no guidance embedding) is a CFG teacher with the empty-prompt negative.

Text (``encode_prompt``): CLIP's pooled output (``pooler_output``, ``(B, 768)`` for the real model) as
``pooled_prompt_embeds`` and T5's last hidden state at ``max_sequence_length`` tokens (padded, no mask: the
pipeline passes none) as ``prompt_embeds``. The negative is the encoded empty prompt.

VAE: ``AutoencoderKL`` with ``scaling_factor`` and ``shift_factor`` (0.3611, 0.1159): denoiser latents are
``(z - shift) * scale`` (:class:`~dmdr.models.vae.AutoencoderKLCodec`).

Per-sample LoRA scales: every attention projection of the double- and single-stream blocks sees batch-first
``(B, L, D)`` inputs, so a ``(B,)`` scale broadcasts per sample and the teacher's score pass stays one call.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from dmdr.guidance import CFG, GUIDANCE_KEY, ScoreRule
from dmdr.models.base import Backbone, Conditioning, Denoiser
from dmdr.models.family import FamilySpec, LoraFormat, PlannerHooks
from dmdr.models.flux_bfl import bfl_lora_layers
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, load_frozen_text_encoder
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.parameterization import FlowMatching

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
"""The attention projections of the double-stream blocks (image and text streams) and of the single-stream
blocks (``to_q/k/v``; their output projection is fused with the MLP's in ``proj_out`` and left out)."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DEFAULT_GUIDANCE = 3.5
"""``FluxPipeline``'s default ``guidance_scale`` (the embedding FLUX.1-dev is usually run at)."""


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height x width`` cells."""
    b, _, d = x.shape
    x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Image position ids ``(rows * cols, 3)`` = ``(0, row, col)``: ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FluxDenoiser(Denoiser):
    """``FluxTransformer2DModel`` behind ``(x_t, t, cond) -> v`` with ``v = eps - x0``, ``t`` in ``[0, 1]``.

    Args:
        net: the transformer.
        t_min: the clean-estimate level.
        guidance: the embedding of calls whose conditioning has no ``guidance`` entry (the generator's
            ``dmd.generator_guidance``; set by :meth:`configure_guidance`).
    """

    def __init__(self, net: nn.Module, t_min: float = 0.001, guidance: float = DEFAULT_GUIDANCE):
        super().__init__(net, FlowMatching(t_min=t_min, timestep_scale=1000.0))
        self.guidance = float(guidance)
        self.true_cfg = 1.0

    @property
    def guidance_embeds(self) -> bool:
        """Whether the network takes the guidance scale as an input (FLUX.1-dev; not schnell)."""
        return bool(self.net.config.guidance_embeds)

    def configure_guidance(self, generator_guidance: float, true_cfg: float = 1.0) -> None:
        self.guidance, self.true_cfg = float(generator_guidance), float(true_cfg)

    def score_rule(self) -> ScoreRule:
        if not self.guidance_embeds:
            return CFG
        return ScoreRule(embedded=True, generator_guidance=self.guidance, true_cfg=self.true_cfg)

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        _, _, height, width = x_t.shape
        text = cond["prompt_embeds"].to(dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = cond.get(GUIDANCE_KEY)
            if guidance is None:
                guidance = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=torch.float32)
        out = self.net(
            hidden_states=pack_latents(x_t.to(dtype)),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=self.parameterization.model_timestep(t.float()).to(dtype) / 1000,  # as the pipeline divides
            img_ids=latent_ids(height // 2, width // 2, x_t.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        return [*self.net.transformer_blocks, *self.net.single_transformer_blocks]


class FluxTextEncoder(FrozenPromptEncoder):
    """CLIP (pooled) and T5 (sequence) with ``FluxPipeline.encode_prompt``'s encoding (see the module doc).

    :attr:`truncated` counts the prompts whose T5 tokens were cut to ``max_sequence_length``.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 max_sequence_length: int = 512):
        super().__init__(text_encoder, text_encoder_2)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, max_sequence_length, D_t5), "pooled_prompt_embeds": (B, D_clip)}``."""
        prompts = list(prompts)
        ids = self.tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length).input_ids
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        ids_2 = self.tokenize(self.tokenizer_2, prompts, self.max_sequence_length, count_as="T5").input_ids
        embeds = self.text_encoder_2(ids_2.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds.to(self.text_encoder_2.dtype),
                "pooled_prompt_embeds": pooled.to(self.text_encoder.dtype)}


def load_text_encoder(folder: ModelFolder, options: LoadOptions) -> FluxTextEncoder:
    """The frozen CLIP and T5 of ``folder`` on ``options.device`` (no transformer or VAE weights read)."""
    return load_frozen_text_encoder(folder, options, TEXT_COMPONENTS, partial(
        FluxTextEncoder, max_sequence_length=options.max_sequence_length))


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The FLUX.1 :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`).

    With ``options.defer_denoiser`` the transformer is built on the meta device and its weight folder goes
    to ``extras["denoiser_weights"]``. ``latent_channels`` are the VAE's (the transformer sees 4x that, packed).
    """
    transformer, vae, extras = load_transformer_and_vae(folder, options)
    text_encoder = load_text_encoder(folder, options) if options.load_text_encoder else None
    codec = AutoencoderKLCodec(vae)
    teacher = FluxDenoiser(transformer, t_min=options.t_min)
    teacher.requires_grad_(False)
    extras["patch_size"] = 2  # the 2x2 packing: one token per 2x2 latent cells
    return Backbone(family="flux", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=codec.latent_channels, vae_scale_factor=codec.scale_factor,
                    lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="flux", pipeline_class="FluxPipeline", load=load, text_component_names=TEXT_COMPONENTS,
    load_text_encoder=load_text_encoder, denoiser_class=FluxDenoiser,
    lora_targets=LORA_TARGETS, no_cfg_guidance=DEFAULT_GUIDANCE,
    lora_format=LoraFormat("transformer", kohya_modules=bfl_lora_layers),
    single_file_class="FluxTransformer2DModel", embedded_guidance=True, pipeline_latents=pack_latents,
    planner=PlannerHooks(flops="dmdr.planning.flops:flux_network_flops",
                         activations="dmdr.planning.activations:flux_activations",
                         text_encoders=("text_encoder", "text_encoder_2"), fixed_text_lengths={"text_encoder": 77},
                         latent_patch=2),
)
"""The diffusers network is the pipeline's own, so LoRA module names carry over to its loader unchanged; the kohya
layout names BFL's modules (:mod:`dmdr.models.flux_bfl`). ``no_cfg_guidance`` is the pipeline's default embedding;
an export writes the run's ``dmd.generator_guidance``."""
