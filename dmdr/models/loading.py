"""Load a model family from a local diffusers folder: family detection, checks, the family registry.

Every check a user's folder can fail runs here, before any weight is read, and fails with one
:class:`~dmdr.errors.ModelLoadError` line naming the folder or component at fault. Weights are read
with ``from_pretrained(..., local_files_only=True)``: nothing downloads.

Adding a family = one adapter module in this package exposing ``required_components(folder, options)``
and ``load(folder, options) -> Backbone`` (honouring ``options.defer_denoiser``), optionally
``load_text_encoder(folder, options)``, plus one :func:`register_family` line at the bottom of this file.

Sharded runs never hold a full copy of the denoiser: with ``defer_denoiser`` the adapter builds it
from its config on the meta device (:meth:`ModelFolder.build_on_meta`) and records its weight folder
in ``Backbone.extras["denoiser_weights"]``; :func:`dmdr.build.build_models` shards it and reads each
rank's rows (:func:`dmdr.distributed.meta_load.materialize_from_safetensors`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmdr.errors import ModelLoadError
from dmdr.models.base import Backbone, TextEncoder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".gguf")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model",
)
_LIBRARIES = ("diffusers", "transformers")


@dataclass(frozen=True)
class Family:
    """A registered model family: the diffusers pipeline class its folders declare and its adapter."""

    name: str
    pipeline_class: str
    module: str
    """Adapter module with ``load(folder: ModelFolder, options: LoadOptions) -> Backbone``."""


FAMILIES: dict[str, Family] = {}


def register_family(name: str, pipeline_class: str, module: str) -> None:
    """Make ``load_backbone`` recognise folders whose ``model_index.json`` names ``pipeline_class``."""
    FAMILIES[name] = Family(name, pipeline_class, module)


@dataclass(frozen=True)
class LoadOptions:
    """What :func:`load_backbone` was asked for, passed through to the adapter."""

    dtype: torch.dtype
    device: torch.device
    load_text_encoder: bool
    t_min: float
    max_sequence_length: int
    defer_denoiser: bool = False
    """Build the denoiser's network on the meta device (no weights read) and set
    ``Backbone.extras["denoiser_weights"]`` to its weight folder, for the sharded loader."""


class ModelFolder:
    """A local diffusers pipeline folder: its ``model_index.json`` and checked component loading."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = path
        self.index = index

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def declared(self, name: str) -> bool:
        """Whether ``model_index.json`` lists component ``name`` (with a non-null class)."""
        entry = self.index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and None not in entry

    def component_class(self, name: str) -> tuple[str, str]:
        if not self.declared(name):
            raise ModelLoadError(f"{self.path}: model_index.json lists no {name!r} component "
                                 f"(a {self.pipeline_class} folder needs one)")
        library, cls = self.index[name]
        if library not in _LIBRARIES:
            raise ModelLoadError(f"{self.path}/{name}: component class {library}.{cls} is not a diffusers or "
                                 "transformers class")
        return library, cls

    def check(self, name: str) -> None:
        """Raise a one-line :class:`ModelLoadError` when component ``name`` is not loadable."""
        _, cls = self.component_class(name)
        sub = self.path / name
        if not sub.is_dir():
            raise ModelLoadError(f"{self.path}: component folder {name}/ ({cls}) is missing; "
                                 "copy the complete pipeline folder")
        files = [p.name for p in sub.iterdir()]
        if "Tokenizer" in cls:
            if not any(f in files for f in _TOKENIZER_FILES):
                raise ModelLoadError(f"{sub}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) "
                                     f"in component folder {name}/")
        elif "Scheduler" in cls:
            if "scheduler_config.json" not in files:
                raise ModelLoadError(f"{sub}: scheduler_config.json is missing in component folder {name}/")
        else:
            if "config.json" not in files:
                raise ModelLoadError(f"{sub}: config.json is missing in component folder {name}/")
            if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
                raise ModelLoadError(f"{sub}: no weights (*.safetensors or *.bin) in component folder "
                                     f"{name}/; the download is incomplete")

    def _class(self, name: str) -> tuple[type, str]:
        library, cls_name = self.component_class(name)
        module = importlib.import_module(library)
        cls = getattr(module, cls_name, None)
        if cls is None:
            raise ModelLoadError(f"{self.path}/{name}: {library} {_version(module)} has no class {cls_name}; "
                                 f"upgrade {library}")
        return cls, cls_name

    def config(self, name: str) -> dict[str, Any]:
        """Component ``name``'s ``config.json`` (no weights read)."""
        file = self.path / name / "config.json"
        try:
            return json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{file} is missing or not valid JSON ({e})") from None

    def build_on_meta(self, name: str, dtype: torch.dtype) -> Any:
        """Diffusers model ``name`` built from its config, parameters on the meta device, in ``dtype``.

        Buffers are real (computed at init, then cast like ``from_pretrained(dtype=...)`` casts them);
        no weight is read: :func:`dmdr.distributed.meta_load.materialize_from_safetensors` fills the
        parameters later from :meth:`weights_folder`, which must hold safetensors files.
        """
        from dmdr.distributed.meta_load import safetensors_files

        self.check(name)
        safetensors_files(self.path / name)  # the sharded loader reads safetensors only: fail before building
        return self.build_config_on_meta(name, dtype)

    def build_config_on_meta(self, name: str, dtype: torch.dtype) -> Any:
        """:meth:`build_on_meta` from the component's ``config.json`` alone: no weight file needs to exist.

        For readers of the architecture only (the planner, :mod:`dmdr.planning`, builds the shipped
        config-only folders with it); the trainer goes through :meth:`build_on_meta`, which checks the
        weights first and then calls this.
        """
        from dmdr.distributed.meta_load import meta_params

        library, _ = self.component_class(name)
        cls, cls_name = self._class(name)
        if library != "diffusers":
            raise ModelLoadError(f"{self.path}/{name}: {cls_name} is a {library} class; only diffusers models "
                                 "are built on the meta device")
        try:
            config = cls.load_config(str(self.path / name), local_files_only=True)
            with meta_params():
                model = cls.from_config(config)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad config, reported in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelLoadError(f"{self.path}/{name}: cannot build {cls_name} from its config.json "
                                 f"({type(e).__name__}: {first[:300]})") from e
        _cast_like_from_pretrained(model, dtype)
        return model

    def weights_folder(self, name: str) -> Path:
        """Where component ``name``'s weight files are."""
        return self.path / name

    def load(self, name: str, dtype: torch.dtype | None = None) -> Any:
        """``from_pretrained`` of component ``name`` (class from ``model_index.json``), local files only."""
        self.check(name)
        cls, cls_name = self._class(name)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None and "Tokenizer" not in cls_name and "Scheduler" not in cls_name:
            kwargs["dtype"] = dtype
        try:
            obj = cls.from_pretrained(str(self.path / name), **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad folder, reported in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelLoadError(f"{self.path}/{name}: cannot load {cls_name} "
                                 f"({type(e).__name__}: {first[:300]})") from e
        return obj


def _version(module: Any) -> str:
    return str(getattr(module, "__version__", ""))


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``dtype`` for every floating tensor, except the parameters diffusers' ``from_pretrained`` keeps in
    fp32 (a name segment in the class's ``_keep_in_fp32_modules``)."""
    torch.nn.Module.to(model, dtype)  # not ModelMixin.to, which warns on every dtype cast
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep or dtype == torch.float32:
        return
    for qualified, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            full = f"{qualified}.{pname}" if qualified else pname
            if p is not None and p.is_floating_point() and any(k in full.split(".") for k in keep):
                module._parameters[pname] = torch.nn.Parameter(p.to(torch.float32), requires_grad=p.requires_grad)


def read_model_index(path: str | Path) -> ModelFolder:
    """Check that ``path`` is a diffusers pipeline folder and read its ``model_index.json``."""
    folder = Path(path).expanduser()
    if not str(path):
        raise ModelLoadError("no model folder given (set --model.path to a local diffusers pipeline folder)")
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist (set --model.path to a local diffusers "
                             "pipeline folder)")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file, not a diffusers pipeline folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json: not a diffusers pipeline folder "
                             "(save one with DiffusionPipeline.save_pretrained)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or not index.get("_class_name"):
        raise ModelLoadError(f"{index_file} has no _class_name: not a diffusers pipeline folder")
    return ModelFolder(folder, index)


def detect_family(folder: ModelFolder, requested: str = "auto") -> Family:
    """The registered family of ``folder``; a mismatch with ``requested`` (unless ``auto``) is an error."""
    known = ", ".join(f"{f.name} ({f.pipeline_class})" for f in FAMILIES.values())
    if requested != "auto" and requested not in FAMILIES:
        raise ModelLoadError(f"unknown model family {requested!r}; dmdr loads: auto, {', '.join(FAMILIES)}")
    found = next((f for f in FAMILIES.values() if f.pipeline_class == folder.pipeline_class), None)
    if found is None:
        raise ModelLoadError(f"{folder.path} is a {folder.pipeline_class} folder, which dmdr cannot load; "
                             f"supported: {known}")
    if requested != "auto" and requested != found.name:
        raise ModelLoadError(f"{folder.path} is a {folder.pipeline_class} folder, not {requested} "
                             f"(set model.family to {found.name} or auto)")
    return found


def load_backbone(path: str | Path, family: str = "auto", dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", load_text_encoder: bool = True, t_min: float = 0.001,
                  max_sequence_length: int = 256, defer_denoiser: bool = False) -> Backbone:
    """Load a model family's frozen teacher, text encoder(s) and VAE from a local diffusers folder.

    Args:
        path: the pipeline folder (``model_index.json`` at its top).
        family: ``auto`` (read ``model_index.json``) or a registered family name (``sd3``, ``zimage``, ``sdxl``).
        dtype: storage dtype of every loaded weight.
        device: where the modules are moved.
        load_text_encoder: ``False`` skips the text encoders and tokenizers (prompt embeddings come
            from a cache); ``Backbone.text_encoder`` is then ``None``.
        t_min: the flow parameterization's clean-estimate level.
        max_sequence_length: text tokens kept per prompt (T5 for SD3, Qwen3 for Z-Image).
        defer_denoiser: build the teacher's network from its config with parameters on the meta device
            (buffers real; ``dtype`` applied, ``device`` not) and read none of its weights; its weight
            folder is ``Backbone.extras["denoiser_weights"]``. For sharded runs: shard it, then
            materialise each rank's rows (:func:`dmdr.build.build_models`). The folder must hold
            ``.safetensors`` weights. Text encoders and VAE load as without it.

    Returns:
        A :class:`Backbone` whose modules are all frozen (``requires_grad=False``, eval mode).

    Raises:
        ModelLoadError: the folder is missing, incomplete, or of another family (one line).
    """
    folder = read_model_index(path)
    fam = detect_family(folder, family)
    adapter = importlib.import_module(fam.module)
    options = LoadOptions(dtype=dtype, device=torch.device(device), load_text_encoder=load_text_encoder,
                          t_min=t_min, max_sequence_length=max_sequence_length, defer_denoiser=defer_denoiser)
    for name in adapter.required_components(folder, options):
        folder.check(name)  # every component checked before the first (slow) weight load
    backbone = adapter.load(folder, options)
    backbone.path = str(folder.path)
    scheduler_config = folder.path / "scheduler" / "scheduler_config.json"
    if folder.declared("scheduler") and scheduler_config.is_file():
        backbone.extras.setdefault("scheduler_config", json.loads(scheduler_config.read_text()))
    return backbone


def load_text_encoders(path: str | Path, family: str = "auto", dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str = "cpu", max_sequence_length: int = 256) -> TextEncoder:
    """Only a family's frozen text encoder(s) and tokenizer(s): no denoiser, no VAE weights are read.

    For tools that only encode prompts (``tools/cache_text_embeddings.py``); same arguments and
    checks as :func:`load_backbone`. A family adapter without ``load_text_encoder`` falls back to a
    whole :func:`load_backbone`.

    Raises:
        ModelLoadError: the folder is missing, incomplete, or of another family (one line).
    """
    folder = read_model_index(path)
    fam = detect_family(folder, family)
    adapter = importlib.import_module(fam.module)
    if not hasattr(adapter, "load_text_encoder"):
        backbone = load_backbone(path, family=fam.name, dtype=dtype, device=device,
                                 max_sequence_length=max_sequence_length)
        assert backbone.text_encoder is not None
        return backbone.text_encoder
    options = LoadOptions(dtype=dtype, device=torch.device(device), load_text_encoder=True, t_min=0.0,
                          max_sequence_length=max_sequence_length)
    for name in adapter.text_components(folder, options):
        folder.check(name)
    return adapter.load_text_encoder(folder, options)


def load_transformer_and_vae(folder: ModelFolder, options: LoadOptions, denoiser: str = "transformer",
                             vae_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, torch.nn.Module,
                                                                           dict[str, Any]]:
    """The frozen denoiser (component ``denoiser``: ``transformer``, or SDXL's ``unet``) and ``vae`` of a
    folder, and the extras they set.

    With ``options.defer_denoiser`` the denoiser is built on the meta device (no weights read) and
    its weight folder goes to ``extras["denoiser_weights"]``; otherwise both load on ``options.device``.
    ``vae_dtype``: the VAE's storage dtype when it differs from ``options.dtype``.
    """
    extras: dict[str, Any] = {"pipeline_class": folder.pipeline_class, "denoiser_component": denoiser}
    if options.defer_denoiser:
        transformer = folder.build_on_meta(denoiser, options.dtype)
        extras["denoiser_weights"] = folder.weights_folder(denoiser)
    else:
        transformer = folder.load(denoiser, options.dtype)
    vae = folder.load("vae", vae_dtype or options.dtype)
    freeze(transformer, vae)
    if not options.defer_denoiser:
        transformer.to(options.device)
    vae.to(options.device)
    return transformer, vae, extras


def freeze(*modules: torch.nn.Module | None) -> None:
    """Eval mode and ``requires_grad=False`` for frozen components."""
    for m in modules:
        if m is not None:
            m.eval()
            m.requires_grad_(False)


register_family("sd3", "StableDiffusion3Pipeline", "dmdr.models.sd3")
register_family("zimage", "ZImagePipeline", "dmdr.models.zimage")
register_family("sdxl", "StableDiffusionXLPipeline", "dmdr.models.sdxl")
