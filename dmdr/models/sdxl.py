"""SDXL family adapter: ``StableDiffusionXLPipeline`` folders (``UNet2DConditionModel``, two CLIPs, SDXL VAE).

Calling convention, read from diffusers' ``StableDiffusionXLPipeline.__call__``:

* the UNet gets the latents, an integer ``timestep`` in ``[0, T)`` of the scheduler's discrete
  ``alphas_cumprod`` table (``T = 1000``), ``encoder_hidden_states`` and
  ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": add_time_ids}``, and predicts ``eps``
  (``prediction_type = "epsilon"``; v-prediction folders are refused);
* ``add_time_ids`` are ``(original size, crop top-left, target size)`` = ``(H, W, 0, 0, H, W)`` in pixels
  for an uncropped ``H x W`` image: :meth:`SDXLDenoiser.predict` builds them from the latent's size
  (they are not text conditioning, so embedding caches stay resolution-free).

So the prediction is our :class:`~dmdr.parameterization.EpsilonPrediction` target as is; levels map to
timesteps as ``t (T - 1)`` snapped to integers (``discrete=True``): the fixed few-step timesteps
``999, 749, 499, 249`` (four steps) and ``399`` (one step, on pure noise) are ``dmd.timesteps`` in the recipe.

Text (``encode_prompt`` without the CFG branch): both CLIP text encoders' penultimate hidden states
(``hidden_states[-2]``), concatenated along features (``(B, 77, 768 + 1280)`` for the real model), and
the pooled, projected output of ``text_encoder_2`` (``(B, 1280)``). The unconditional branch follows the
teacher's pipeline: with ``force_zeros_for_empty_prompt`` (SDXL base's setting) it is all zeros, not the
encoded empty prompt.

VAE: the SDXL VAE overflows in fp16; as the pipeline does for a VAE whose config says ``force_upcast``,
it is kept in fp32 when the run asks for fp16 weights (ReFL decodes through it). A folder whose ``vae/``
is the fp16-fix VAE (``force_upcast: false``) stays in fp16.

Per-sample LoRA scales: every adapted layer sees batch-first inputs (attention projections
``(B, L, D)``, ``time_emb_proj`` ``(B, D)``, convolutions ``(B, C, H, W)``), so a ``(B,)`` scale
broadcasts per sample and the 3x-batch teacher call stays one pass.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from dmdr.errors import ModelLoadError
from dmdr.models.base import Backbone, Conditioning, Denoiser
from dmdr.models.family import FamilySpec
from dmdr.models.folder import LoadOptions, ModelFolder, load_transformer_and_vae
from dmdr.models.text import FrozenPromptEncoder, load_frozen_text_encoder
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.parameterization import EpsilonPrediction

LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
"""The UNet's ``Linear`` layers of its transformer blocks and the ``Conv2d`` / time projections of its
resnets and resamplers (the usual SDXL LoRA set; the ``conv_in`` / ``conv_out`` ends are left out)."""

FEW_STEP_TIMESTEPS = {4: (999, 749, 499, 249), 1: (399,)}
"""DMD2's and the authors' fixed SDXL generator timesteps by step count (``dmd.timesteps``); the one-step
generator is called at 399 on pure noise (their ``sdxl_Base.py`` demo: ``LCMScheduler``, ``timesteps=[399]``)."""

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
PREDICTION_TYPE = "epsilon"


class SDXLDenoiser(Denoiser):
    """``UNet2DConditionModel`` behind ``(x_t, t, cond) -> eps``, ``t`` in ``[0, 1]`` (``t = 1``: timestep T - 1).

    Args:
        net: the UNet.
        alphas_cumprod: the teacher scheduler's ``(T,)`` table.
        vae_scale_factor: pixels per latent cell (for ``add_time_ids``).
        t_min: the lowest critic / renoise level.
    """

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, vae_scale_factor: int, t_min: float = 0.0):
        super().__init__(net, EpsilonPrediction(alphas_cumprod, t_min=t_min, discrete=True))
        self.vae_scale_factor = int(vae_scale_factor)

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.net.dtype
        batch, _, h, w = x_t.shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=x_t.device)
        out = self.net(
            x_t.to(dtype),
            self.parameterization.model_timestep(t.float()),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"].to(dtype),
                               "time_ids": time_ids.expand(batch, 6)},
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def blocks(self) -> list[nn.Module]:
        """Down blocks, the mid block, up blocks: each one FSDP2 / activation-checkpointing unit."""
        net = self.net
        return [*net.down_blocks, *([net.mid_block] if net.mid_block is not None else []), *net.up_blocks]


class SDXLTextEncoder(FrozenPromptEncoder):
    """The two CLIP text encoders with ``StableDiffusionXLPipeline.encode_prompt``'s encoding (see module doc).

    :attr:`truncated` counts the prompts cut to CLIP's 77 tokens.

    Args:
        zero_negative: the unconditional conditioning is zeros (the pipeline's ``force_zeros_for_empty_prompt``).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 zero_negative: bool = True):
        super().__init__(text_encoder, text_encoder_2)
        self.tokenizers = (tokenizer, tokenizer_2)
        self.encoders = (text_encoder, text_encoder_2)
        self.zero_negative = zero_negative

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": (B, 77, D1 + D2), "pooled_prompt_embeds": (B, P2)}``."""
        prompts = list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            count = "CLIP" if tokenizer is self.tokenizers[0] else None  # a prompt counts once
            ids = self.tokenize(tokenizer, prompts, tokenizer.model_max_length, count_as=count).input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (text_encoder_2)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ModelLoadError("neither SDXL text encoder returns a pooled projection: text_encoder_2 must be a "
                                 "CLIPTextModelWithProjection")
        dtype = self.encoders[1].dtype
        return {"prompt_embeds": torch.cat(hidden, dim=-1).to(dtype), "pooled_prompt_embeds": pooled.to(dtype)}

    def unconditional(self) -> Conditioning:
        """Zeros or the encoded empty prompt (``zero_negative``)."""
        neg = self.encode([""])
        return {k: torch.zeros_like(v) for k, v in neg.items()} if self.zero_negative else neg


def load_text_encoder(folder: ModelFolder, options: LoadOptions) -> SDXLTextEncoder:
    """The frozen CLIPs of ``folder`` on ``options.device`` (no UNet or VAE weights read)."""
    zero_negative = bool(folder.index.get("force_zeros_for_empty_prompt", True))
    return load_frozen_text_encoder(folder, options, TEXT_COMPONENTS,
                                    partial(SDXLTextEncoder, zero_negative=zero_negative))


def alphas_cumprod(folder: ModelFolder) -> Tensor:
    """The teacher scheduler's ``alphas_cumprod``; a non-epsilon ``prediction_type`` is refused (one line)."""
    scheduler = folder.load("scheduler")
    kind = getattr(scheduler.config, "prediction_type", PREDICTION_TYPE)
    if kind != PREDICTION_TYPE:
        raise ModelLoadError(f"{folder.path}/scheduler: prediction_type {kind!r}; dmdr's sdxl family trains "
                             f"{PREDICTION_TYPE}-prediction UNets only")
    return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)


def vae_dtype(folder: ModelFolder, dtype: torch.dtype) -> torch.dtype:
    """fp32 for an fp16 run when the VAE's config says ``force_upcast`` (the SDXL VAE overflows in fp16)."""
    if dtype == torch.float16 and folder.config("vae").get("force_upcast", False):
        return torch.float32
    return dtype


def load(folder: ModelFolder, options: LoadOptions) -> Backbone:
    """The SDXL :class:`Backbone` of ``folder`` (checked by :func:`dmdr.models.load_backbone`).

    With ``options.defer_denoiser`` the UNet is built on the meta device and its weight folder goes to
    ``extras["denoiser_weights"]`` (see :func:`dmdr.models.load_backbone`).
    """
    table = alphas_cumprod(folder)
    unet, vae, extras = load_transformer_and_vae(folder, options, denoiser="unet",
                                                 vae_dtype=vae_dtype(folder, options.dtype))
    text_encoder = load_text_encoder(folder, options) if options.load_text_encoder else None
    codec = AutoencoderKLCodec(vae)
    teacher = SDXLDenoiser(unet, table, codec.scale_factor, t_min=options.t_min)
    teacher.requires_grad_(False)
    return Backbone(family="sdxl", teacher=teacher, text_encoder=text_encoder, codec=codec,
                    latent_channels=int(unet.config.in_channels), vae_scale_factor=codec.scale_factor,
                    lora_targets=LORA_TARGETS, extras=extras)


FAMILY = FamilySpec(
    name="sdxl", pipeline_class="StableDiffusionXLPipeline", load=load, text_component_names=TEXT_COMPONENTS,
    extra_components=("scheduler",), load_text_encoder=load_text_encoder, denoiser_class=SDXLDenoiser,
    lora_targets=LORA_TARGETS, denoiser_component="unet", prediction="epsilon", no_cfg_guidance=0.0,
)
"""No LoRA key format (the UNet's diffusers LoRA names differ: export the merged pipeline), no single-file
class on the card, no planner model yet."""
