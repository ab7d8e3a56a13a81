"""The paper's differentiable reward models (ALGORITHM.md, RL branch), loaded from local files only.

* :class:`HPSReward` (``hps``): HPSv2.1, an open_clip ViT-H-14 built *without* pretrained weights and
  loaded from the local HPS checkpoint ``rl.hps_checkpoint`` (``{"state_dict": ...}`` or a plain
  state dict, ``.pt``/``.bin``/``.safetensors``). Prompts are prefixed ``"Realistic photo "``.
  Score: cosine of the L2-normalised image and text features (what HPSv2 reports), in ``[-1, 1]``.
* :class:`CLIPReward` (``clip``): DFN-CLIP, an open_clip model from a local folder ``rl.clip_model``
  in the hub layout (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``/``.safetensors``),
  loaded through open_clip's ``local-dir:`` schema. Score: cosine of the normalised features.
* :class:`PickScoreReward` (``pickscore``): a transformers ``CLIPModel`` + tokenizer from a local
  folder ``rl.pickscore_model``. PickScore is ``logit_scale.exp() * cosine`` (about 20 for typical
  images, ``logit_scale.exp()`` being 100); the reward returns it times ``scale`` (*default* 0.01,
  i.e. PickScore / 100, on the same footing as the cosines above, so ReFL's margin 0.7 means the
  same thing for every reward). ``scale=1`` gives the raw PickScore.

Every model is frozen (``requires_grad_(False)``, ``eval()``) on the given device; the text side runs
under ``no_grad``, the image side keeps its graph so gradients reach the images. Images go through
the one shared :class:`~dmdr.rewards.preprocess.ImagePreprocess` at the model's own input size and
mean/std (its config: a ViT's position embeddings fix the size, and HPS (224) and DFN-CLIP-378 need
different ones); ``rl.reward_resolution`` is only the fallback for a model that declares no size.
Nothing is ever downloaded: a missing or malformed path raises a one-line
:class:`~dmdr.errors.ConfigError` / :class:`~dmdr.errors.ModelLoadError` naming the config field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.errors import ConfigError, ModelLoadError
from dmdr.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

log = logging.getLogger("dmdr")

HPS_PREFIX = "Realistic photo "
HPS_ARCH = "ViT-H-14"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def error_line(err: BaseException) -> str:
    """The first informative line of an exception's message (at most 300 characters), for one-line errors."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # "Error(s) in loading state_dict for CLIP:" says nothing without the line that follows it.
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text[:300]


def _need_file(field: str, path: str | Path, what: str) -> Path:
    if not str(path):
        raise ConfigError(f"--{field}: not set; point it at {what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--{field}: {p} does not exist (expected {what})")
    if not p.is_file():
        raise ConfigError(f"--{field}: {p} is not a file (expected {what})")
    return p


def _need_dir(field: str, path: str | Path, what: str, required: tuple[str, ...] = ()) -> Path:
    if not str(path):
        raise ConfigError(f"--{field}: not set; point it at {what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--{field}: {p} does not exist (expected {what})")
    if not p.is_dir():
        raise ConfigError(f"--{field}: {p} is not a folder (expected {what})")
    for name in required:
        if not (p / name).is_file():
            raise ModelLoadError(f"--{field}: {p} has no {name} (expected {what})")
    if not any(f.suffix in _WEIGHT_SUFFIXES for f in p.iterdir() if f.is_file()):
        raise ModelLoadError(f"--{field}: {p} has no weights file ({'/'.join(_WEIGHT_SUFFIXES)}; expected {what})")
    return p


def _freeze(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    model = model.to(device)
    model.requires_grad_(False)
    return model.eval()


def _cosine(image_features: Tensor, text_features: Tensor) -> Tensor:
    return (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(dim=-1)


def _preprocess_for(size: Any, mean: Any, std: Any, fallback: int) -> ImagePreprocess:
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else tuple(size)
    return ImagePreprocess(size or fallback, mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD)


class _FrozenModelReward:
    """Where a frozen reward model lives: ``self.model``'s device and dtype."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> _FrozenModelReward:
        self.model.to(device)
        return self


class _OpenCLIPReward(_FrozenModelReward):
    """Shared scoring for open_clip models: cosine(encode_image(pre(x)), encode_text(tok(prefix + p)))."""

    name = "openclip"
    prefix = ""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ImagePreprocess):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def texts(self, prompts: list[str]) -> list[str]:
        return [self.prefix + p for p in prompts]

    def image_features(self, images: Tensor) -> Tensor:
        """Unnormalised image embeddings of ``[0, 1]`` RGB images (differentiable)."""
        return self.model.encode_image(self.preprocess(images.to(self.device), dtype=self.dtype))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """Unnormalised text embeddings of the (prefixed) prompts."""
        return self.model.encode_text(self.tokenizer(self.texts(list(prompts))).to(self.device))

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        return _cosine(self.image_features(images), self.text_features(prompts))


class HPSReward(_OpenCLIPReward):
    """HPSv2.1: open_clip ``arch`` (*default* ViT-H-14) + the local HPS checkpoint; cosine score.

    ``prefix`` is prepended to every prompt (*default* ``"Realistic photo "``, the training reward's).
    """

    name = "hps"
    prefix = HPS_PREFIX

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", arch: str = HPS_ARCH,
                 resolution: int = 224, field: str = "rl.hps_checkpoint", prefix: str = HPS_PREFIX):
        import open_clip

        self.prefix = prefix  # training's "Realistic photo "; "" is the HPSv2 benchmark's own scoring

        path = _need_file(field, checkpoint, "a local HPSv2.1 checkpoint file, e.g. HPS_v2.1_compressed.pt")
        if arch not in open_clip.list_models():
            raise ConfigError(f"--{field}: open_clip has no model config {arch!r} for the HPS architecture")
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        state = load_state_dict_file(path, field)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ModelLoadError(f"--{field}: {path} does not fit open_clip {arch}: {error_line(e)}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"--{field}: {path} does not fit open_clip {arch}: {len(result.missing_keys)} missing keys "
                f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}")
        pp = model.visual.preprocess_cfg
        super().__init__(_freeze(model, device), open_clip.get_tokenizer(arch),
                         _preprocess_for(pp.get("size"), pp.get("mean"), pp.get("std"), resolution))


def load_state_dict_file(path: Path, field: str) -> dict[str, Tensor]:
    """A tensor state dict from ``.pt``/``.bin``/``.pth``/``.safetensors`` (a ``{"state_dict": ...}`` wrapper and
    DDP's ``module.`` prefix removed); anything else is one :class:`ModelLoadError` naming ``--field``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt: Any = load_file(str(path), device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelLoadError(f"--{field}: {path} is not a readable checkpoint: {error_line(e)}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, Tensor) for v in ckpt.values()):
        raise ModelLoadError(f"--{field}: {path} is not a state dict nor a {{'state_dict': ...}} checkpoint")
    if all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


class CLIPReward(_OpenCLIPReward):
    """DFN-CLIP (any open_clip model) from a local hub-layout folder; cosine score, no prompt prefix."""

    name = "clip"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", resolution: int = 224,
                 field: str = "rl.clip_model"):
        import open_clip

        what = "a local open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin/.safetensors)"
        path = _need_dir(field, folder, what, required=("open_clip_config.json",))
        if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
            raise ModelLoadError(f"--{field}: open_clip {open_clip.__version__} cannot load local folders "
                                 "('local-dir:' schema); upgrade open-clip-torch")
        spec = "local-dir:" + str(path)
        try:
            model = open_clip.create_model(spec, device="cpu", require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(spec)
        except Exception as e:  # noqa: BLE001 - wrong config / weights / tokenizer: one line for the user
            raise ModelLoadError(f"--{field}: cannot load the open_clip model in {path}: {error_line(e)}") from None
        pp = getattr(model.visual, "preprocess_cfg", {})
        super().__init__(_freeze(model, device), tokenizer,
                         _preprocess_for(pp.get("size"), pp.get("mean"), pp.get("std"), resolution))


class PickScoreReward(_FrozenModelReward):
    """PickScore: transformers ``CLIPModel`` from a local folder; ``scale * logit_scale.exp() * cosine``."""

    name = "pickscore"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", resolution: int = 224,
                 scale: float = 0.01, field: str = "rl.pickscore_model", what: str = ""):
        from transformers import AutoTokenizer, CLIPModel

        what = what or "a local PickScore folder (CLIPModel save_pretrained layout with its tokenizer)"
        path = _need_dir(field, folder, what, required=("config.json",))
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"--{field}: cannot load a CLIPModel + tokenizer from {path}: "
                                 f"{error_line(e)}") from None
        mean, std = _image_stats(path)
        self.model = _freeze(model, device)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.preprocess = _preprocess_for(model.config.vision_config.image_size, mean, std, resolution)

    def image_features(self, images: Tensor) -> Tensor:
        """Unnormalised projected image embeddings of ``[0, 1]`` RGB images (differentiable)."""
        pixels = self.preprocess(images.to(self.device), dtype=self.dtype)
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """Unnormalised projected text embeddings (padded to the model's context, truncated)."""
        m = self.model
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=m.config.text_config.max_position_embeddings, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return m.text_projection(m.text_model(**tok).pooler_output)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        cosine = _cosine(self.image_features(images), self.text_features(prompts))
        return self.scale * self.model.logit_scale.exp() * cosine


def _image_stats(path: Path) -> tuple[Any, Any]:
    """The folder's image-processor mean/std when it ships one (PickScore does), else OpenAI CLIP's."""
    if not (path / "preprocessor_config.json").is_file():
        return None, None
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        return getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    except Exception as e:  # noqa: BLE001
        log.warning("pickscore: unreadable preprocessor_config.json in %s (%s); using OpenAI CLIP stats", path,
                    error_line(e))
        return None, None


__all__ = ["HPSReward", "CLIPReward", "PickScoreReward", "HPS_PREFIX", "HPS_ARCH", "load_state_dict_file",
           "error_line"]
