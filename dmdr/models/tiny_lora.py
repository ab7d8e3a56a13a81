"""A random LoRA for a tiny (or any) pipeline folder's denoiser, written as diffusers writes one: for the tests and the
re-turbo benchmark's stand-in "user adapter" (peft's layers, diffusers' key format and ``lora_adapter_metadata``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdr.models.adapters import LORA_WEIGHT_FILE
from dmdr.models.families import family_of_pipeline


def denoiser_of(model_path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, str]:
    """The plain diffusers denoiser of a pipeline folder (its class from its ``config.json``) and its component name."""
    import diffusers

    index = json.loads((Path(model_path) / "model_index.json").read_text())
    family = family_of_pipeline(index["_class_name"])
    component = family.denoiser_component if family else "transformer"
    config = json.loads((Path(model_path) / component / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(str(Path(model_path) / component), dtype=dtype, local_files_only=True), component


def write_random_lora(model_path: str | Path, out: str | Path, *, rank: int = 4, alpha: float = 8.0,
                      targets: tuple[str, ...] = ("to_q", "to_k", "to_v"), seed: int = 0,
                      std: float = 0.05) -> Path:
    """A peft LoRA on the denoiser of ``model_path`` with random ``A`` and ``B`` (normal, ``std``), saved in diffusers'
    format (``<component>.<module>.lora_A/lora_B.weight``, metadata ``r`` and ``lora_alpha``) as ``out/``
    :data:`~dmdr.models.adapters.LORA_WEIGHT_FILE`. Returns the file."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    net, component = denoiser_of(model_path)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    state = {f"{component}.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(net).items()}
    meta = {f"{component}.r": rank, f"{component}.lora_alpha": alpha, f"{component}.target_modules": list(targets)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / LORA_WEIGHT_FILE), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return out / LORA_WEIGHT_FILE
