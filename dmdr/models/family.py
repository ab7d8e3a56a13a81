"""What a model family is, declared once, next to its adapter (``FAMILY = FamilySpec(...)`` at the bottom of
:mod:`dmdr.models.sd3`, :mod:`dmdr.models.zimage`, :mod:`dmdr.models.sdxl`).

Loading, preflight, export, the release forms, the model card, the planner and the config all read a
family through its spec (registry: :mod:`dmdr.models.families`), never through ``if family == ...``: adding
a family (Qwen-Image, FLUX) is an adapter module in this package with its spec, one line in the registry,
and a recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dmdr.models.base import Backbone, Denoiser, LatentCodec, TextEncoder
    from dmdr.models.folder import LoadOptions, ModelFolder


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class LoraFormat:
    """How a family's LoRA keys are spelled for its diffusers pipeline loader (``load_lora_weights``)."""

    prefix: str
    """The pipeline component the adapter belongs to (``transformer``, or ``unet`` for SDXL)."""
    rename: Callable[[str], str] = _same
    """dmdr's module name in the network (the network's own ``named_modules``) -> the loader's module name."""
    kohya_prefix: str = "lora_unet_"
    """``--lora-format kohya``: the key prefix before the loader's module name with ``.`` written ``_``
    (``lora_unet_<module>.lora_down.weight``, ``lora_up``, ``alpha``: kohya's and ComfyUI's layout)."""
    kohya_modules: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """``--lora-format kohya`` for a family whose kohya / ComfyUI files name the original checkpoint's modules, not
    diffusers' (FLUX.1: BFL's, with fused q/k/v): dmdr's ``{module: (A, B)}`` -> ``{kohya module: (down, up)}``, the
    same weight change (:func:`dmdr.models.flux_bfl.bfl_lora_layers`); ``None``: :attr:`rename`'s names."""


@dataclass(frozen=True)
class PlannerHooks:
    """What the planner (:mod:`dmdr.planning`) needs beyond the family's config files.

    The FLOP and activation models are ``module:function`` references, resolved by the planner: they are
    planner math (they count a network's blocks), and this package does not import the planner.
    """

    flops: str
    """``(denoiser, tokens, adapters) -> list[BlockFlops]`` (see :mod:`dmdr.planning.flops`)."""
    activations: str
    """``(denoiser, tokens, bytes, mode, adapter=) -> BlockActivations`` (see :mod:`dmdr.planning.activations`)."""
    text_encoders: tuple[str, ...]
    """``model_index.json`` names of the text encoders."""
    extra_text_tokens: int = 0
    """Text tokens the denoiser sees beyond ``model.max_sequence_length`` (SD3: CLIP's 77 beside T5's)."""
    fixed_text_lengths: Mapping[str, int] = field(default_factory=dict)
    """Text encoders that always run at a fixed length (SD3's CLIPs: 77), by component name."""
    mlp_ratio: tuple[int, int] = (4, 1)
    """The blocks' MLP hidden width over the model width, as a fraction (Z-Image: 8/3)."""
    latent_patch: int = 0
    """Latent cells per token side when the transformer's config does not say it (FLUX.1 packs 2x2 cells into
    one token with ``patch_size`` 1); 0: the config's ``patch_size``."""


@dataclass(frozen=True)
class FamilySpec:
    """A model family: its diffusers pipeline, its adapter's functions and the facts other packages need."""

    name: str
    """The ``model.family`` value (``sd3``, ``zimage``, ``sdxl``)."""
    pipeline_class: str
    """The ``_class_name`` its folders' ``model_index.json`` declares."""
    load: Callable[[ModelFolder, LoadOptions], Backbone]
    """The adapter's loader (honours ``options.defer_denoiser``)."""
    load_text_encoder: Callable[[ModelFolder, LoadOptions], TextEncoder]
    """Only the frozen text encoder(s) and tokenizer(s) (for tools that only encode prompts)."""
    denoiser_class: type[Denoiser]
    """The :class:`~dmdr.models.base.Denoiser` wrapping the network (the planner builds it on meta)."""
    lora_targets: tuple[str, ...]
    """The default LoRA target module names (``model.lora_targets`` empty)."""
    denoiser_component: str = "transformer"
    """The pipeline component of the denoiser (``transformer``, or SDXL's ``unet``)."""
    prediction: Literal["flow", "epsilon"] = "flow"
    """What the network predicts: a flow velocity (exported with ``FlowMatchEulerDiscreteScheduler``) or
    ``eps`` (an epsilon UNet, exported with ``LCMScheduler`` and fixed timesteps)."""
    no_cfg_guidance: float = 0.0
    """The pipeline's ``guidance_scale`` that switches CFG off: SD3 and SDXL guide iff > 1, Z-Image iff > 0."""
    lora_format: LoraFormat | None = None
    """Its diffusers LoRA key format; ``None``: no LoRA export (export the merged pipeline)."""
    single_file_class: str | None = None
    """The diffusers class that loads the exported denoiser by ``from_single_file`` (the card names it)."""
    planner: PlannerHooks | None = None
    """``None``: the planner has no model of this family yet."""
    make_codec: Callable[[Any], LatentCodec] | None = None
    """The :class:`~dmdr.models.base.LatentCodec` of a loaded VAE (``None``: ``AutoencoderKLCodec``); tools that hold
    only a stock pipeline use it for dmdr's latent shape (FLUX.2: the VAE's patchified, normalised latents)."""
    pipeline_latents: Callable[[Any], Any] | None = None
    """dmdr's initial noise ``(B, C, H, W)`` -> the stock pipeline's ``latents=`` argument (FLUX.1: packed 2x2);
    ``None``: passed as is."""
    embedded_guidance: bool = False
    """The pipeline's ``guidance_scale`` feeds a guidance embedding (FLUX.1-dev), not CFG: exports call it at the
    run's ``dmd.generator_guidance`` (see :mod:`dmdr.guidance`)."""
    text_component_names: tuple[str, ...] = ()
    """The text encoders' and tokenizers' components, when every folder of the family has the same ones."""
    folder_text_components: Callable[[ModelFolder, LoadOptions], list[str]] | None = None
    """Instead of :attr:`text_component_names`, when they depend on the folder (SD3's optional T5 pair)."""
    extra_components: tuple[str, ...] = ()
    """Components :attr:`load` reads beside the denoiser, ``vae`` and the text ones (SDXL's ``scheduler``)."""

    def text_components(self, folder: ModelFolder, options: LoadOptions) -> list[str]:
        """The text encoders' and tokenizers' components of ``folder``."""
        if self.folder_text_components is not None:
            return self.folder_text_components(folder, options)
        return list(self.text_component_names)

    def required_components(self, folder: ModelFolder, options: LoadOptions) -> list[str]:
        """Every component :attr:`load` reads, checked before the first weight is."""
        names = [self.denoiser_component, "vae", *self.extra_components]
        if options.load_text_encoder:
            names += self.text_components(folder, options)
        return names
