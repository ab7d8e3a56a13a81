"""A local diffusers pipeline folder: ``model_index.json``, checked component loading, building on meta.

Every check a user's folder can fail runs here, before any weight is read, and fails with one
:class:`~dmdr.errors.ModelLoadError` line naming the folder or component at fault. Weights are read
with ``from_pretrained(..., local_files_only=True)``: nothing downloads. Family adapters
(:mod:`dmdr.models.sd3`, ...) build on this; :mod:`dmdr.models.loading` picks the family and calls them.

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
from dmdr.models.weights import meta_params, safetensors_files

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model",
)
_LIBRARIES = ("diffusers", "transformers")


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
            if not any(f in files for f in TOKENIZER_FILES):
                raise ModelLoadError(f"{sub}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) "
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
        self.check(name)
        safetensors_files(self.path / name)  # the sharded loader reads safetensors only: fail before building
        return self.build_config_on_meta(name, dtype)

    def build_config_on_meta(self, name: str, dtype: torch.dtype) -> Any:
        """:meth:`build_on_meta` from the component's ``config.json`` alone: no weight file needs to exist.

        For readers of the architecture only (the planner, :mod:`dmdr.planning`, builds the shipped
        config-only folders with it); the trainer goes through :meth:`build_on_meta`, which checks the
        weights first and then calls this.
        """
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

