"""Z-Image family adapter: ``ZImagePipeline`` folders (``ZImageTransformer2DModel``, Qwen3, Flux VAE).

Calling convention, read from diffusers' ``ZImagePipeline.__call__``:

* the transformer takes LISTS: one ``(C, 1, H, W)`` latent (a frame axis) and one ``(L_i, D)``
  caption feature per sample, ``L_i`` the prompt's own token count (no padding);
* its time input is ``(1000 - timestep) / 1000 = 1 - sigma`` (``t = 0`` is noise for the network,
  which scales it by ``t_scale = 1000`` inside);
* it predicts ``x0 - noise``; the pipeline negates the output before the Euler step
  ``x + (sigma_next - sigma) * (-out)``.

So our velocity at ``t = sigma`` is ``v = eps - x0 = -net(x, 1 - t, caps)``.

Text: the prompt goes through the tokenizer's chat template as one user message with
``add_generation_prompt=True, enable_thinking=True``, is tokenized padded to ``max_sequence_length``
with truncation, and the Qwen3 hidden states of the second-to-last layer at the attention-mask
positions are the caption features. Here they are kept batch-first, padded: ``prompt_embeds``
``(B, max_sequence_length, D)`` with the valid tokens first and zeros after, and ``prompt_mask``
``(B, max_sequence_length)`` bool (a prefix mask); :meth:`ZImageDenoiser.predict` unpads them.

Per-sample LoRA scales: every attention projection (refiners and main layers) sees batch-first
``(B, L, D)`` inputs with the full batch (the transformer pads its per-sample sequences into one
batch tensor), so a ``(B,)`` scale broadcasts per sample. The patch and caption embedders see the
whole batch flattened to ``(sum L_i, D)``: LoRA there accepts only float scales.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from dmdr.models.base import Backbone, Conditioning, Denoiser
from dmdr.models.family import FamilySpec, LoraFormat, PlannerHooks
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, chat_prompt, load_frozen_text_encoder, valid_tokens_first
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.parameterization import FlowMatching

LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
"""Attention projections of the noise refiner, the context refiner and the main layers."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer")


class ZImageDenoiser(Denoiser):
    """``ZImageTransformer2DModel`` behind ``(x_t, t, cond) -> v`` with ``v = eps - x0``, ``t=1`` noise."""

    masked_attention = True  # captions of different lengths in one batch: a key padding mask

    def __init__(self, net: nn.Module, t_min: float = 0.001):
        super().__init__(net, FlowMatching(t_min=t_min, timestep_scale=1000.0))

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        embeds = cond["prompt_embeds"]
        lengths = cond["prompt_mask"].sum(dim=1).tolist()  # one host sync; the net loops per sample anyway
        caps = [embeds[i, :n].to(dtype) for i, n in enumerate(lengths)]
        latents = list(x_t.to(dtype).unsqueeze(2).unbind(dim=0))
        out = self.net(latents, 1.0 - t.float(), caps, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2).to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        return [*self.net.noise_refiner, *self.net.context_refiner, *self.net.layers]


class ZImageTextEncoder(FrozenPromptEncoder):
    """Qwen3 with ``ZImagePipeline.encode_prompt``'s formatting, padded batch-first (see module doc)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 256):
        super().__init__(text_encoder)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length

    def format(self, prompt: str) -> str:
        return chat_prompt(self.tokenizer, prompt, thinking=True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, L, D), "prompt_mask": (B, L) bool}``, ``L = max_sequence_length``."""
        length = self.max_sequence_length
        inputs = self.tokenize(self.tokenizer, [self.format(p) for p in prompts], length, count_as="Qwen")
        ids = inputs.input_ids.to(self.device)
        mask = inputs.attention_mask.to(self.device).bool()
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # Valid tokens first whatever the tokenizer's padding side (the pipeline keeps hidden[i][mask[i]]).
        embeds, prefix = valid_tokens_first(out.hidden_states[-2], mask, length)
        return {"prompt_embeds": embeds, "prompt_mask": prefix}


def load_text_encoder(folder: ModelFolder, options: LoadOptions) -> ZImageTextEncoder:
    """The frozen Qwen3 encoder and tokenizer of ``folder`` on ``options.device`` (nothing else read)."""
    return load_frozen_text_encoder(folder, options, TEXT_COMPONENTS, partial(
        ZImageTextEncoder, max_sequence_length=options.max_sequence_length))


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The Z-Image :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`).

    With ``options.defer_denoiser`` the transformer is built on the meta device and its weight
    folder goes to ``extras["denoiser_weights"]`` (see :func:`dmdr.models.load_backbone`).
    """
    transformer, vae, extras = load_transformer_and_vae(folder, options)
    text_encoder = load_text_encoder(folder, options) if options.load_text_encoder else None
    codec = AutoencoderKLCodec(vae)
    teacher = ZImageDenoiser(transformer, t_min=options.t_min)
    teacher.requires_grad_(False)
    extras["patch_size"] = int(transformer.config.all_patch_size[0])
    return Backbone(family="zimage", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=int(transformer.config.in_channels), vae_scale_factor=codec.scale_factor,
                    lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="zimage", pipeline_class="ZImagePipeline", load=load, text_component_names=TEXT_COMPONENTS,
    load_text_encoder=load_text_encoder, denoiser_class=ZImageDenoiser,
    lora_targets=LORA_TARGETS, no_cfg_guidance=0.0, lora_format=LoraFormat("transformer"),
    single_file_class="ZImageTransformer2DModel",
    planner=PlannerHooks(flops="dmdr.planning.flops:zimage_network_flops",
                         activations="dmdr.planning.activations:zimage_activations",
                         text_encoders=("text_encoder",), mlp_ratio=(8, 3)),
)
"""The diffusers network is the pipeline's own, so LoRA module names carry over to its loader unchanged."""
