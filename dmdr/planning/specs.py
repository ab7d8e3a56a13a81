"""Model specs for the planner: every network of a run built on the meta device from its config files.

Nothing here reads a weight. A *model folder* is a diffusers pipeline folder with the configs only
(``model_index.json`` and each component's ``config.json``); the planner ships the public configs of
the models the recipes train (:data:`SHIPPED`, under ``dmdr/planning/configs/``; sources in its
README) and reads a user's real folder the same way. The denoiser is built by the trainer's own
builder (:meth:`dmdr.models.folder.ModelFolder.build_config_on_meta`), wrapped in the family's
:class:`~dmdr.models.base.Denoiser`, and given the generator and critic LoRA by the trainer's
:func:`dmdr.build.build_roles`, so parameter shapes, FSDP units (``Denoiser.blocks()`` then the root)
and adapter sizes are the run's own. Text encoders (transformers), the VAE (diffusers) and the reward
models (open_clip / transformers) are built on meta from their configs too.

Adding a family (SDXL is being added): ship its configs, give its
:class:`~dmdr.models.family.FamilySpec` the :class:`~dmdr.models.family.PlannerHooks` naming its activation
and FLOP model (:mod:`dmdr.planning.activations`, :mod:`dmdr.planning.flops`), and map its recipe in
:data:`RECIPE_MODELS`.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmdr.build import build_roles
from dmdr.config import TrainConfig
from dmdr.devices import DTYPES
from dmdr.distributed.parallelize import outer_block_lists
from dmdr.errors import ConfigError, ModelLoadError
from dmdr.models.base import Backbone
from dmdr.models.families import FAMILIES, family_spec
from dmdr.models.family import PlannerHooks
from dmdr.models.folder import ModelFolder, read_model_index
from dmdr.models.loading import detect_family

CONFIGS = Path(__file__).parent / "configs"
SHIPPED = {"sd3.5-large": CONFIGS / "sd3.5-large", "sd3-medium": CONFIGS / "sd3-medium",
           "z-image-turbo": CONFIGS / "z-image-turbo", "flux.1-dev": CONFIGS / "flux.1-dev"}
"""Config-only folders of the models the recipes train."""
RECIPE_MODELS = {"sd35_dmdr": "sd3.5-large", "sd3m_dmdr": "sd3-medium", "zimage_dmdr": "z-image-turbo",
                 "flux_dmdr": "flux.1-dev"}
"""Which shipped model a recipe trains (``--model`` or ``--model.path`` choose another)."""
SHIPPED["qwen-image"] = CONFIGS / "qwen-image"
RECIPE_MODELS["qwenimage_dmdr"] = "qwen-image"
SHIPPED["flux.2-klein-base-4b"] = CONFIGS / "flux.2-klein-base-4b"
SHIPPED["flux.2-klein-base-9b"] = CONFIGS / "flux.2-klein-base-9b"
RECIPE_MODELS["flux2_dmdr"] = "flux.2-klein-base-9b"  # the larger klein (``--model flux.2-klein-base-4b``: the 4B)
REWARD_CONFIGS = {"hps": CONFIGS / "rewards" / "hps", "clip": CONFIGS / "rewards" / "clip",
                  "pickscore": CONFIGS / "rewards" / "pickscore"}
"""HPSv2.1 (open_clip ViT-H-14), DFN5B-CLIP ViT-H-14-378 (open_clip), PickScore (transformers CLIP ViT-H-14)."""

def plan_hooks(family_name: str) -> PlannerHooks:
    """The planner's hooks of a family; a family without any is a one-line :class:`ConfigError`."""
    hooks = family_spec(family_name).planner
    if hooks is None:
        have = ", ".join(f.name for f in FAMILIES.values() if f.planner is not None)
        raise ConfigError(f"the planner has no model of family {family_name!r} yet (has: {have})")
    return hooks


@functools.cache
def resolve_hook(ref: str) -> Callable[..., Any]:
    """The function a ``module:function`` hook reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Tensors:
    """Shapes and element sizes of a group of tensors (one FSDP unit, one adapter, ...)."""

    shapes: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Tensors:
        return cls([(tuple(t.shape), t.element_size()) for t in tensors])

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s, _ in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * e for s, e in self.shapes)

    def shard_numel(self, world: int) -> int:
        """Elements on the largest shard when each tensor is split along dim 0 over ``world`` ranks (FSDP2)."""
        return sum(_shard_rows(s, world) for s, _ in self.shapes)

    def shard_bytes(self, world: int, element_size: int | None = None) -> int:
        return sum(_shard_rows(s, world) * (element_size or e) for s, e in self.shapes)


def _shard_rows(shape: tuple[int, ...], world: int) -> int:
    """FSDP2's dim-0 chunking (``torch.chunk``): rank 0 holds ``ceil(d0 / world)`` rows (the most)."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / world) if world > 1 else shape[0]
    return rows * math.prod(shape[1:])


@dataclass
class Component:
    """A frozen network (text encoder, VAE, reward model): its parameters and the module on meta."""

    name: str
    cls_name: str
    params: Tensors
    module: nn.Module | None = None
    blocks: list[Tensors] = field(default_factory=list)
    """Its outermost repeated layers (what ``parallel.frozen_encoders shard`` shards one by one)."""


@dataclass
class DenoiserSpec:
    """The teacher network with both adapters, by FSDP unit, and its architecture."""

    family: str
    denoiser: nn.Module
    """The meta-device :class:`~dmdr.models.base.Denoiser` (LoRA injected as the trainer does)."""
    config: dict[str, Any]
    blocks: list[Tensors]
    """Frozen base parameters of each ``Denoiser.blocks()`` entry (each one FSDP unit)."""
    root: Tensors
    """Frozen base parameters outside the blocks (the root FSDP unit)."""
    buffers: int
    """Buffer bytes (FSDP2 does not shard buffers: every rank holds them)."""
    generator_lora: Tensors
    critic_lora: Tensors
    block_generator_lora: list[Tensors]
    block_critic_lora: list[Tensors]

    @property
    def base(self) -> Tensors:
        return Tensors([s for t in [*self.blocks, self.root] for s in t.shapes])


@dataclass
class ModelSpec:
    """Every network a run holds, from its config files."""

    name: str
    path: Path
    family: str
    denoiser: DenoiserSpec
    text_encoders: list[Component]
    vae: Component
    rewards: dict[str, Component]
    latent_channels: int
    """The VAE's latent channels (what its decoder takes)."""
    vae_scale_factor: int
    patch_size: int
    vae_frames: bool = False
    """The VAE is a video VAE decoding ``(B, C, F, H, W)`` (Qwen-Image's, on one frame)."""


def resolve_model_folder(cfg: TrainConfig, recipe: str, model: str = "") -> tuple[str, Path]:
    """``(name, folder)`` of the model to plan: ``model`` (a shipped name or a folder), else
    ``model.path``, else the recipe's shipped model."""
    choice = model or cfg.model.path or RECIPE_MODELS.get(recipe, "")
    if not choice:
        raise ConfigError(f"recipe {recipe!r} has no shipped model configs; pass --model "
                          f"({', '.join(SHIPPED)}) or --model.path <a diffusers folder>")
    if choice in SHIPPED:
        return choice, SHIPPED[choice]
    path = Path(choice).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {choice!r} is neither a shipped model ({', '.join(SHIPPED)}) nor a folder")
    return path.name, path


def _meta_transformers(folder: Path, cls_name: str) -> nn.Module:
    """A transformers model of class ``cls_name`` from ``folder/config.json``, on the meta device."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ModelLoadError(f"{folder}: transformers has no class {cls_name}")
    config = cls.config_class.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        return cls._from_config(config)


def _component(name: str, cls_name: str, module: nn.Module, dtype: torch.dtype | None) -> Component:
    if dtype is not None:
        module.to(dtype)
    blocks = [Tensors.of(list(b.parameters())) for lst in outer_block_lists(module) for b in lst]
    return Component(name, cls_name, Tensors.of(list(module.parameters())), module, blocks)


def build_reward_spec(name: str) -> Component:
    """A reward model on meta from its shipped config (fp32: open_clip and transformers load it so)."""
    if name not in REWARD_CONFIGS:
        raise ConfigError(f"--rl.rewards: the planner has no config of reward {name!r} "
                          f"(has: {', '.join(REWARD_CONFIGS)})")
    folder = REWARD_CONFIGS[name]
    if (folder / "open_clip_config.json").is_file():
        import open_clip

        model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        with torch.device("meta"):
            module = open_clip.model.CLIP(**model_cfg)
        return _component(name, "open_clip.CLIP", module, None)
    return _component(name, "CLIPModel", _meta_transformers(folder, "CLIPModel"), None)


def build_denoiser_spec(cfg: TrainConfig, folder: ModelFolder, family: str) -> DenoiserSpec:
    """The teacher on meta with the generator and critic LoRA, injected by the trainer's own code."""
    fam = family_spec(family)
    net = folder.build_config_on_meta(fam.denoiser_component, DTYPES[cfg.model.dtype])
    net.requires_grad_(False)
    teacher = fam.denoiser_class(net, t_min=cfg.dmd.t_min)
    backbone = Backbone(family=family, teacher=teacher, text_encoder=None, codec=None, latent_channels=0,
                        vae_scale_factor=8, lora_targets=fam.lora_targets)
    lora_cfg = _lora_mode(cfg)
    build_roles(lora_cfg, backbone)  # generator LoRA (always, to size it) and critic LoRA, as a run injects them
    blocks = teacher.blocks()

    def split(module: nn.Module) -> tuple[Tensors, Tensors, Tensors]:
        base, gen, crit = [], [], []
        for pname, p in module.named_parameters():
            (gen if ".lora_" in f".{pname}" and pname.endswith(".generator") else
             crit if ".lora_" in f".{pname}" and pname.endswith(".critic") else base).append(p)
        return Tensors.of(base), Tensors.of(gen), Tensors.of(crit)

    per_block = [split(b) for b in blocks]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for n, p in teacher.named_parameters() if id(p) not in in_blocks and ".lora_" not in f".{n}"]
    root_gen = [p for n, p in teacher.named_parameters() if id(p) not in in_blocks and n.endswith(".generator")]
    root_crit = [p for n, p in teacher.named_parameters() if id(p) not in in_blocks and n.endswith(".critic")]
    gen = Tensors([s for b in per_block for s in b[1].shapes] + Tensors.of(root_gen).shapes)
    crit = Tensors([s for b in per_block for s in b[2].shapes] + Tensors.of(root_crit).shapes)
    buffers = sum(b.numel() * b.element_size() for b in teacher.buffers())
    return DenoiserSpec(family=family, denoiser=teacher, config=dict(net.config), blocks=[b[0] for b in per_block],
                        root=Tensors.of(root), buffers=buffers, generator_lora=gen, critic_lora=crit,
                        block_generator_lora=[b[1] for b in per_block], block_critic_lora=[b[2] for b in per_block])


def _lora_mode(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``generator_mode lora``: the planner sizes the full copy from the base, the adapter from this."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.generator_mode = "lora"
    return out


def build_model_spec(cfg: TrainConfig, recipe: str = "", model: str = "") -> ModelSpec:
    """Every network of the run ``cfg`` on the meta device, from the model's config files."""
    name, path = resolve_model_folder(cfg, recipe, model)
    folder = read_model_index(path)
    family = detect_family(folder, cfg.model.family).name
    hooks = plan_hooks(family)
    dtype = DTYPES[cfg.model.dtype]
    denoiser = build_denoiser_spec(cfg, folder, family)
    texts = []
    for comp in hooks.text_encoders:
        if folder.declared(comp):
            _, cls_name = folder.component_class(comp)
            texts.append(_component(comp, cls_name, _meta_transformers(path / comp, cls_name), dtype))
    vae = _component("vae", "AutoencoderKL", folder.build_config_on_meta("vae", dtype), None)
    rewards = {} if cfg.rl.method == "none" else {
        r: build_reward_spec(r) for r in cfg.rl.rewards if r in REWARD_CONFIGS}
    c = denoiser.config
    patch = hooks.latent_patch or (int(c["patch_size"]) if "patch_size" in c else int(c["all_patch_size"][0]))
    channels, scale, frames = vae_geometry(vae.module.config)
    return ModelSpec(name=name, path=path, family=family, denoiser=denoiser, text_encoders=texts, vae=vae,
                     rewards=rewards, latent_channels=channels, vae_scale_factor=scale, patch_size=patch,
                     vae_frames=frames)


def vae_geometry(config: Any) -> tuple[int, int, bool]:
    """``(latent channels, pixels per latent cell, frame axis)`` of a VAE from its config: an ``AutoencoderKL``
    (``block_out_channels``, ``latent_channels``) or a 3-D video VAE (``AutoencoderKLQwenImage``: ``z_dim``, one
    spatial halving per ``temperal_downsample`` entry, latents ``(B, C, F, H, W)``)."""
    if "temperal_downsample" in config:
        return int(config["z_dim"]), 2 ** len(config["temperal_downsample"]), True
    return int(config["latent_channels"]), 2 ** (len(config["block_out_channels"]) - 1), False
