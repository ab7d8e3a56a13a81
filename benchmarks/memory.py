"""Memory of the distributed layer, as ratios measured in one run (CPU, gloo, W=1 and W=2).

    python benchmarks/memory.py [--layers 6] [--width 768]

Prints one table:

* per-rank bytes of parameters + gradients + AdamW state after one FSDP2 step, W=2 / W=1
  (target <= 0.55: everything is sharded, nothing replicated);
* peak host RSS growth while loading the model: diffusers ``from_pretrained`` (a full copy), the
  meta-device loader in one process, and the meta-device loader per rank at W=2 against the budget
  ``model / W + one block (+ text encoders, none here)``;
* peak host RSS growth per rank of ``dmdr.build.build_models`` at W=2 (what ``build_run`` builds:
  teacher, generator LoRA, critic LoRA, text encoders, VAE; ``model.generator_mode lora``, fp32) on
  the tiny SD3 pipeline with its transformer replaced by one of the size above (so the transformer,
  not the allocator's noise, dominates), against ``(transformer + LoRA) / W + one block + text
  encoders + VAE``. A first build on the unmodified tiny pipeline warms up the lazy imports;
* step time with full activation checkpointing / without (the recompute overhead), on a smaller model.

The model is a diffusers ``SD3Transformer2DModel`` with random weights written by ``save_pretrained``
into a temporary folder (about 0.5 GB at the default size). Peak RSS is the kernel's high-water mark
(``VmHWM``), reset before each load through ``/proc/self/clear_refs``; where that is not allowed a
5 ms sampler stands in. Each measurement runs in fresh processes so freed memory of one cannot hide
the next one's growth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dmdr.config import ParallelConfig
from dmdr.distributed import (
    build_mesh,
    collect_released_objects,
    init_distributed,
    load_sharded_pretrained,
    parallelize_denoiser,
)
from dmdr.models.sd3 import SD3Denoiser  # the adapter training uses, not a stand-in

GB = 1 << 30


# ------------------------------------------------------------------------------------------------ #
# Peak host memory
# ------------------------------------------------------------------------------------------------ #

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Growth of resident memory over a block: peak minus the resident size at entry."""

    def __enter__(self) -> PeakRSS:
        self.start = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self._sampler = None
        except OSError:
            self._peak = self.start
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._sampler is None:
            self.growth = _status_kb("VmHWM") - self.start
        else:
            self._stop.set()
            self._sampler.join()
            self.growth = max(self._peak, _status_kb("VmRSS")) - self.start


# ------------------------------------------------------------------------------------------------ #
# Model
# ------------------------------------------------------------------------------------------------ #

def sd3_config(layers: int, width: int) -> dict:
    heads = width // 64
    return dict(num_layers=layers, attention_head_dim=64, num_attention_heads=heads,
                joint_attention_dim=width, caption_projection_dim=width, pooled_projection_dim=width,
                in_channels=16, out_channels=16, sample_size=32, patch_size=2, pos_embed_max_size=32)


def _batch(width: int, n: int, side: int, tokens: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, side, side, generator=g)
    cond = {"prompt_embeds": torch.randn(n, tokens, width, generator=g),
            "pooled_prompt_embeds": torch.randn(n, width, generator=g)}
    return x, torch.rand(n, generator=g), cond, torch.randn(n, 16, side, side, generator=g)


@torch.no_grad()
def _touch(model: nn.Module) -> None:
    """Read every parameter: weights still in a lazily mapped file become resident, as they do at step 1."""
    for p in model.parameters():
        (p.to_local() if isinstance(p, DTensor) else p).sum()


def _local_bytes(t: Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _train_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = 0
    for p in model.parameters():
        total += _local_bytes(p)
        if p.grad is not None:
            total += _local_bytes(p.grad)
    for state in opt.state.values():
        total += sum(_local_bytes(v) for v in state.values() if isinstance(v, Tensor))
    return total


# ------------------------------------------------------------------------------------------------ #
# Workers (one process per rank; results as JSON files)
# ------------------------------------------------------------------------------------------------ #

def _worker(rank: int, world: int, port: int, task: str, folder: str, out: str, width: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from diffusers import SD3Transformer2DModel

    env = init_distributed(device="cpu")
    result: dict = {}
    try:
        if task == "build_models":
            result.update(_build_models_growth(folder, world))
            return
        if task == "full_load":
            with PeakRSS() as peak:
                model = SD3Transformer2DModel.from_pretrained(folder)
                _touch(model)
            result["load_growth"] = peak.growth
            return
        mesh = build_mesh(ParallelConfig(), world)
        parallel = ParallelConfig(param_dtype="fp32", activation_checkpointing="none")
        config = SD3Transformer2DModel.load_config(folder)
        with PeakRSS() as peak:
            model = load_sharded_pretrained(
                lambda: SD3Denoiser(SD3Transformer2DModel.from_config(config)), folder, prefix="net.",
                prepare=lambda m: parallelize_denoiser(m, mesh, parallel, trainable=True))
            _touch(model)
        result["load_growth"] = peak.growth
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        x, t, cond, target = _batch(width, 2 // world, 8, 8)
        F.mse_loss(model(x, t, cond), target).backward()
        opt.step()
        result["train_state_bytes"] = _train_state_bytes(model, opt)  # grads kept: the peak of a step
        if task == "ac_timing":
            result.update(_ac_timing(world))
    finally:
        (Path(out) / f"{task}-w{world}-r{rank}.json").write_text(json.dumps(result))
        env.destroy()
    collect_released_objects()


def _build_cfg(path: str):
    from dmdr.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.path, cfg.model.dtype, cfg.model.generator_mode = path, "fp32", "lora"
    cfg.model.max_sequence_length = 16
    cfg.parallel.param_dtype = "fp32"
    return cfg


def _build_models_growth(folder: str, world: int) -> dict:
    """Peak RSS growth of ``build_models`` on pipeline ``folder``, after a warm-up build on the tiny one."""
    from dmdr.build import build_models

    mesh = build_mesh(ParallelConfig(), world) if world > 1 else None
    cpu = torch.device("cpu")
    # Imports and lazily built library state (diffusers/transformers modules) are not the models' memory.
    warm = build_models(_build_cfg(str(Path(folder).parent / "tiny-sd3")), cpu, mesh)
    del warm
    gc.collect()
    with PeakRSS() as peak:
        backbone, generator, _ = build_models(_build_cfg(folder), cpu, mesh)
        _touch(backbone.teacher)
    return {"build_growth": peak.growth}


def _write_pipeline(root: Path, layers: int, width: int) -> tuple[Path, dict[str, int]]:
    """The tiny SD3 pipeline (warm-up) and a copy whose transformer is ``layers x width``; their byte counts."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from dmdr.models.lora import inject_lora
    from dmdr.models.sd3 import LORA_TARGETS
    from dmdr.models.tiny import build_tiny_sd3

    tiny = build_tiny_sd3(root / "tiny-sd3")
    pipeline = root / "pipeline"
    shutil.copytree(tiny, pipeline)
    shutil.rmtree(pipeline / "transformer")
    torch.manual_seed(0)
    # The tiny text encoders' widths (joint 32, pooled 16 + 16): a coherent, runnable pipeline.
    model = SD3Transformer2DModel(**dict(sd3_config(layers, width), joint_attention_dim=32,
                                         pooled_projection_dim=32))
    model.save_pretrained(pipeline / "transformer")
    sizes = {"transformer": sum(p.numel() * p.element_size() for p in model.parameters()),
             "block": max(sum(p.numel() * p.element_size() for p in b.parameters())
                          for b in model.transformer_blocks)}
    cfg = _build_cfg(str(pipeline)).model  # the adapters build_models injects (default ranks)
    inject_lora(model, "generator", cfg.generator_lora_rank, cfg.generator_lora_alpha, LORA_TARGETS)
    inject_lora(model, "critic", cfg.critic_lora_rank, cfg.critic_lora_alpha, LORA_TARGETS)
    sizes["lora"] = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    del model
    sizes["encoders_vae"] = sum(f.stat().st_size for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                             "vae") for f in (pipeline / name).glob("*.safetensors"))
    return pipeline, sizes


def _ac_timing(world: int, repeats: int = 4) -> dict:
    """Step time (forward + backward) with full activation checkpointing and without, same weights and batch.

    The two models alternate step by step and each keeps its fastest step, so load from other
    processes on the machine shifts both alike.
    """
    from diffusers import SD3Transformer2DModel

    width = 256
    models = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        models[mode] = SD3Denoiser(SD3Transformer2DModel(**sd3_config(4, width)))
        parallel = ParallelConfig(activation_checkpointing=mode)
        parallelize_denoiser(models[mode], None, parallel, trainable=True)
    x, t, cond, target = _batch(width, 2, 32, 32)
    samples: dict[str, list[float]] = {"none": [], "full": []}
    for i in range(repeats + 1):
        for mode in (("none", "full") if i % 2 else ("full", "none")):
            start = time.perf_counter()
            F.mse_loss(models[mode](x, t, cond), target).backward()
            if i:  # the first round warms up the allocator
                samples[mode].append(time.perf_counter() - start)
            models[mode].zero_grad(set_to_none=True)
    return {"step_time_none": min(samples["none"]), "step_time_full": min(samples["full"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(task: str, world: int, folder: Path, out: Path, width: int) -> list[dict]:
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), task, str(folder), str(out), width),
                                nprocs=world, join=True)
    return [json.loads((out / f"{task}-w{world}-r{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=768, help="hidden size (a multiple of 64)")
    args = ap.parse_args(argv)
    from diffusers import SD3Transformer2DModel

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmdr-mem-") as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "results"
        out.mkdir()
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**sd3_config(args.layers, args.width))
        model.save_pretrained(folder)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters())
                          for b in model.transformer_blocks)
        del model

        full = _run("full_load", 1, folder, out, args.width)[0]
        one = _run("ac_timing", 1, folder, out, args.width)[0]
        two = _run("sharded", 2, folder, out, args.width)
        pipeline, sizes = _write_pipeline(Path(tmp), args.layers, args.width)
        built = _run("build_models", 2, pipeline, out, args.width)

    state_ratio = max(r["train_state_bytes"] for r in two) / one["train_state_bytes"]
    w2_load = max(r["load_growth"] for r in two)
    budget = model_bytes / 2 + block_bytes
    ac_ratio = one["step_time_full"] / one["step_time_none"]
    build = max(r["build_growth"] for r in built)
    build_budget = (sizes["transformer"] + sizes["lora"]) / 2 + sizes["block"] + sizes["encoders_vae"]
    rows = [
        ("model (fp32 params) / one block", f"{model_bytes / GB:.3f} GB", f"{block_bytes / GB:.3f} GB", "",
         ""),
        ("params+grads+AdamW per rank (W=1 | W=2)", f"{one['train_state_bytes'] / GB:.3f} GB",
         f"{max(r['train_state_bytes'] for r in two) / GB:.3f} GB", f"{state_ratio:.3f}", "b/a <= 0.55"),
        ("peak RSS growth at load: from_pretrained | meta W=1", f"{full['load_growth'] / GB:.3f} GB",
         f"{one['load_growth'] / GB:.3f} GB", f"{one['load_growth'] / model_bytes:.3f}", "b/model"),
        ("peak RSS growth at load per rank, meta W=2 | budget", f"{w2_load / GB:.3f} GB",
         f"{budget / GB:.3f} GB",
         f"{w2_load / budget:.3f}", "a/b <= 1.0"),
        ("peak RSS growth of build_models per rank, W=2 | budget", f"{build / GB:.3f} GB",
         f"{build_budget / GB:.3f} GB", f"{build / build_budget:.3f}", "a/b <= 1.0"),
        ("step time AC full | none (4x256, 2x256 tokens)", f"{one['step_time_full'] * 1e3:.0f} ms",
         f"{one['step_time_none'] * 1e3:.0f} ms", f"{ac_ratio:.3f}", "a/b (AC overhead)"),
    ]
    header = ("metric", "a", "b", "ratio", "ratio of / target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print(f"SD3 transformer {args.layers} layers x {args.width}, CPU / gloo; budget = model/W + one block "
          f"(no text encoders)")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"build_models budget = (transformer {sizes['transformer'] / GB:.3f} GB + LoRA {sizes['lora'] / GB:.3f} GB)"
          f" / 2 + one block {sizes['block'] / GB:.3f} GB + text encoders and VAE "
          f"{sizes['encoders_vae'] / GB:.4f} GB (tiny SD3 pipeline, generator LoRA mode, fp32)")
    print(f"total {time.perf_counter() - started:.0f} s")
    ok = state_ratio <= 0.55 and w2_load <= budget and build <= build_budget
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
