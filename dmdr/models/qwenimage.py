"""Qwen-Image family adapter: ``QwenImagePipeline`` folders (``QwenImageTransformer2DModel``, Qwen2.5-VL,
``AutoencoderKLQwenImage``).

Calling convention, read from diffusers 0.42's ``QwenImagePipeline.__call__``:

* latents ``(B, 16, H, W)`` are packed into 2x2 patches, ``(B, H/2 * W/2, 64)`` (channel-major inside a
  patch: ``_pack_latents``), and the network is told the patch grid by ``img_shapes = [[(1, H/2, W/2)]] * B``
  (one frame): its RoPE is built from it;
* the network's time input is ``timestep / 1000`` with the scheduler's ``timestep = 1000 sigma``, i.e.
  ``sigma`` itself (its sinusoidal projection multiplies by 1000 inside);
* it predicts ``noise - x0``, which the ``FlowMatchEulerDiscreteScheduler`` integrates as
  ``x + (sigma_next - sigma) * out``: our velocity ``v = eps - x0`` at ``t = sigma`` as is.

So :meth:`QwenImageDenoiser.predict` packs, calls with ``(1000 t) / 1000`` (the pipeline's own float ops, so
the exported pipeline reproduces it to the last bit of the time input) and unpacks.

Text (``_get_qwen_prompt_embeds``): every prompt is put into Qwen-Image's system-prompt template
(:data:`PROMPT_TEMPLATE`), tokenized padded to the batch's longest (truncated at ``max_sequence_length +``
:data:`DROP_IDX`), and the Qwen2.5-VL's LAST hidden states at the attention-mask positions, with the first
:data:`DROP_IDX` = 34 template tokens dropped, are the prompt's features. Here they are batch-first and
right-padded: ``prompt_embeds`` ``(B, L, 3584)`` (zeros after each prompt's tokens) and ``prompt_mask``
``(B, L)`` bool (a prefix mask), ``L`` the batch's longest prompt (at most ``max_sequence_length``; the
pipeline's ``max_sequence_length`` cut after the drop keeps the same first tokens, the encoder being causal).
Padding of any length is equivalent (the network masks it; :meth:`QwenImageDenoiser.predict` trims to the
batch's longest prompt), which is what lets the embedding cache store each prompt at its own length.

Negative prompt: Qwen-Image's convention is ``" "`` (one space: its model card's ``negative_prompt`` for
true CFG, "an empty string if you do not have a specific concept to remove"), so :meth:`negative` encodes
:data:`NEGATIVE_PROMPT`. True CFG in the stock pipeline also rescales the guided prediction to the norm of
the conditional one per token (``comb * |cond| / |comb|``); dmdr's real score does NOT: it is the plain
``v_u + w (v_c - v_u)`` of ALGORITHM.md, as FastGen's Qwen-Image DMD2 (``guidance_scale = 4.0``, plain CFG
on the teacher's clean estimate). The distilled generator runs without CFG (``true_cfg_scale = 1``).

VAE: the 3-D ``AutoencoderKLQwenImage`` takes ``(B, 3, F, H, W)`` video with a frame axis (``F = 1`` here)
and normalises its latent per channel: denoiser latents are ``(z - latents_mean) / latents_std`` (the
pipeline's decode is ``latents / (1 / std) + mean``), 8 pixels per latent cell (``2 ** len(temperal_downsample)``).

Per-sample LoRA scales: every attention projection (image stream ``to_q/k/v``, ``to_out.0``; text stream
``add_q/k/v_proj``, ``to_add_out``) sees batch-first ``(B, L, D)`` inputs, so a ``(B,)`` scale broadcasts per
sample and the 3x-batch teacher call stays one pass.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from dmdr.models.base import Backbone, Conditioning, Denoiser, sequence_lengths
from dmdr.models.family import FamilySpec, LoraFormat, PlannerHooks
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, load_frozen_text_encoder, valid_tokens_first
from dmdr.parameterization import FlowMatching

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
"""The dual-stream blocks' attention projections, image stream and text stream."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer")

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""``QwenImagePipeline.prompt_template_encode`` (diffusers 0.42)."""
DROP_IDX = 34
"""``QwenImagePipeline.prompt_template_encode_start_idx``: the template's leading tokens, dropped."""
NEGATIVE_PROMPT = " "
"""Qwen-Image's negative prompt for true CFG (its model card); see the module doc."""
PATCH = 2
"""The transformer's patch side (``patch_size``; the pipeline's packing is hard-wired to 2)."""


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4 C)``: ``QwenImagePipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height x width`` cells."""
    b, _, d = packed.shape
    c = d // (PATCH * PATCH)
    x = packed.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def trim_padding(cond: Conditioning) -> tuple[Tensor, Tensor | None]:
    """The prompt embeddings and mask cut to the batch's longest prompt, the mask dropped when it masks nothing
    (as the pipeline does).

    One host sync (the longest length). Any padding length gives the same output, the network masking it;
    trimming only saves the attention over it.
    """
    longest = int(sequence_lengths(cond).max()) if len(cond["prompt_mask"]) else 0
    embeds, valid = cond["prompt_embeds"][:, :longest], cond["prompt_mask"][:, :longest].bool()
    return embeds, (None if bool(valid.all()) else valid)


class QwenImageDenoiser(Denoiser):
    """``QwenImageTransformer2DModel`` behind ``(x_t, t, cond) -> v`` with ``v = eps - x0``, ``t`` in ``[0, 1]``."""

    masked_attention = True  # prompts of different lengths in one batch: a key padding mask

    def __init__(self, net: nn.Module, t_min: float = 0.001):
        super().__init__(net, FlowMatching(t_min=t_min, timestep_scale=1000.0))

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        _, _, height, width = x_t.shape
        if height % PATCH or width % PATCH:
            raise ValueError(f"Qwen-Image latents need an even side, got {height}x{width} (resolution must be a "
                             f"multiple of {2 * PATCH} x the VAE's pixels per latent cell)")
        embeds, mask = trim_padding(cond)
        # The pipeline feeds (1000 sigma in the latents' dtype) / 1000: the same float ops, the same input.
        timestep = self.parameterization.model_timestep(t.float()).to(x_t.dtype) / 1000
        out = self.net(
            hidden_states=pack_latents(x_t.to(dtype)),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[[(1, height // PATCH, width // PATCH)]] * x_t.shape[0],
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        return list(self.net.transformer_blocks)


class QwenImageTextEncoder(FrozenPromptEncoder):
    """Qwen2.5-VL with ``QwenImagePipeline._get_qwen_prompt_embeds``'s encoding, padded batch-first (module doc)."""

    negative_prompt = NEGATIVE_PROMPT

    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512):
        super().__init__(text_encoder)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, L, D), "prompt_mask": (B, L) bool}``, ``L`` the longest prompt's tokens."""
        inputs = self.tokenize(self.tokenizer, [PROMPT_TEMPLATE.format(p) for p in prompts],
                               self.max_sequence_length + DROP_IDX, padding=True, count_as="Qwen2.5-VL",
                               shown_length=self.max_sequence_length)
        ids = inputs.input_ids.to(self.device)
        mask = inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        valid = mask.bool()
        # Each prompt's tokens wherever the tokenizer pads, less the template's first DROP_IDX, valid tokens first.
        keep = valid & (valid.cumsum(dim=1) > DROP_IDX)
        embeds, prefix = valid_tokens_first(hidden, keep, int(keep.sum(dim=1).max()))
        return {"prompt_embeds": embeds, "prompt_mask": prefix}


class QwenImageCodec:
    """The 3-D ``AutoencoderKLQwenImage`` on one frame, in the trainer's ``(B, 16, H, W)`` latent convention."""

    def __init__(self, vae: nn.Module):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (the pipeline's ``vae_scale_factor``)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(like.device, like.dtype), self.std.to(like.device, like.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to RGB in ``[0, 1]`` (in the latents' dtype); differentiable (ReFL runs through it)."""
        z = latents.to(self.vae.dtype)
        mean, std = self._stats(z)
        z = z / (1.0 / std) + mean  # the pipeline's exact expression
        image = self.vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
        return (image / 2 + 0.5).clamp(0, 1).to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """RGB in ``[0, 1]`` to denoiser latents: the posterior mean (a sample when given ``generator``)."""
        dist = self.vae.encode((images.to(self.vae.dtype) * 2 - 1).unsqueeze(2), return_dict=False)[0]
        z = (dist.sample(generator) if generator is not None else dist.mode())[:, :, 0]
        mean, std = self._stats(z)
        return ((z - mean) / std).to(images.dtype)

    def to(self, device: torch.device | str) -> QwenImageCodec:
        self.vae.to(device)
        return self


def load_text_encoder(folder: ModelFolder, options: LoadOptions) -> QwenImageTextEncoder:
    """The frozen Qwen2.5-VL and tokenizer of ``folder`` on ``options.device`` (nothing else read)."""
    return load_frozen_text_encoder(folder, options, TEXT_COMPONENTS, partial(
        QwenImageTextEncoder, max_sequence_length=options.max_sequence_length))


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The Qwen-Image :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`).

    With ``options.defer_denoiser`` the transformer is built on the meta device and its weight
    folder goes to ``extras["denoiser_weights"]`` (see :func:`dmdr.models.load_backbone`).
    """
    transformer, vae, extras = load_transformer_and_vae(folder, options)
    text_encoder = load_text_encoder(folder, options) if options.load_text_encoder else None
    codec = QwenImageCodec(vae)
    teacher = QwenImageDenoiser(transformer, t_min=options.t_min)
    teacher.requires_grad_(False)
    extras["patch_size"] = int(transformer.config.patch_size)
    return Backbone(family="qwenimage", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=int(transformer.config.in_channels) // (PATCH * PATCH),
                    vae_scale_factor=codec.scale_factor, lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="qwenimage", pipeline_class="QwenImagePipeline", load=load, text_component_names=TEXT_COMPONENTS,
    load_text_encoder=load_text_encoder, denoiser_class=QwenImageDenoiser,
    lora_targets=LORA_TARGETS, no_cfg_guidance=1.0, lora_format=LoraFormat("transformer"),
    single_file_class="QwenImageTransformer2DModel",
    planner=PlannerHooks(flops="dmdr.planning.flops:qwenimage_network_flops",
                         activations="dmdr.planning.activations:qwenimage_activations",
                         text_encoders=("text_encoder",)),
)
"""The diffusers network is the pipeline's own, so LoRA module names carry over to its loader unchanged.
``no_cfg_guidance``: the stock pipeline's true CFG is off at its default ``true_cfg_scale = 1`` whatever
``guidance_scale`` says (that one only feeds guidance-distilled variants, ``guidance_embeds``)."""
