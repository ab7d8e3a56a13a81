"""The GPU fast path proven in one short device run: kernels, attention backends, a tiny DMDR run.

    make gpu-check                                  # = python benchmarks/gpu_check.py --out runs/gpu-check

On one CUDA GPU (a few minutes in a venv with the project installed; ``pip install -e ".[gpu]"`` adds
flash-attn) it prints ONE table, every ratio measured in this run:

* kernel correctness on CUDA in bf16, fp16 and fp32 against float64 evaluations of the torch
  references (renoise, the DMD score difference for velocity and epsilon models, the fused DMD loss
  gradient, lora_linear forward and its five gradients): the checks of ``tools/profile.py``;
* kernel speed at SD3.5-Large / Z-Image shapes with ``tools/profile.py``'s timings: GB/s as a fraction
  of the device copy bandwidth measured first, speed-up over torch eager and over ``torch.compile``,
  and the LoRA matmul's overhead over the bare cuBLAS matmul, against the targets of kernels/README.md;
* attention backends, native SDPA against flash-attn (``flash`` for SD3, ``flash_varlen`` for
  Z-Image's padded captions), on a tiny-but-wide transformer of each family (2 blocks, width 1536,
  4096 image tokens, bf16): forward + backward time, speed-up, largest difference;
* a 20-step DMDR run of ``recipes/tiny_dmdr.py`` on CUDA as users run it in bf16 (bf16 weights and
  autocast, ``parallel.compile`` on every block, full activation checkpointing, ``model.attention auto``)
  in a fresh process: steps/s, MFU and peak memory of its last logged interval, the attention backend it
  chose, and how many steps were skipped as non-finite (any fails the check).

It exits 1 when a kernel check fails (a wrong kernel, or a training run that does not finish or skips a
non-finite step), 0
otherwise; a missing flash-attn is shown in the table, not failed. Without CUDA it says it needs a
GPU, runs the kernel checks in the Triton interpreter (fp32, fp16) and exits 0 when they pass (CI runs
this mode). The table also goes to ``<out>/gpu_check.md`` and ``.csv``, headed by the GPU, the date
and the commit, ready to paste into the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dmdr.cli import profile
from dmdr.provenance import source_commit

REPO = Path(__file__).resolve().parents[1]
GPU = torch.cuda.is_available()
if not GPU:  # before the first import of a @triton.jit module (tools/profile.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")



# kernels/README.md's targets (GPU): fraction of copy bandwidth and speed-up over eager for the score
# difference; LoRA overhead over the base matmul.
SCORE_DIFF_BW, SCORE_DIFF_EAGER, LORA_OVERHEAD = 0.85, 3.0, 0.10
LATENT = ((16, 128, 128), 2)  # SD3.5-Large / Z-Image at 1024 px, batch 2
LORA_SHAPES = [("sd35-large", 2432, 64, 4096), ("zimage", 3840, 64, 4096)]


def row(section: str, item: str, result: str, ratio: str = "", ok: bool | None = None) -> dict:
    return {"section": section, "item": item, "result": result, "ratio": ratio,
            "ok": "" if ok is None else ("yes" if ok else "FAIL")}


# ---------------------------------------------------------------------------------------- correctness
def kernel_check_rows(checks: list[dict]) -> list[dict]:
    """profile.interpreter_checks' rows folded per op and dtype: the worst error as a fraction of its tolerance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in checks:
        op = c["op"].split(" d")[0] + (" grads" if " d" in c["op"] else "")  # lora_linear dx..dB -> grads
        groups.setdefault((op, c["dtype"]), []).append(c)
    out = []
    for (op, dtype), cs in groups.items():
        worst = max(cs, key=lambda c: float(c["max_rel_err"]) / float(c["tol"]))
        frac = float(worst["max_rel_err"]) / float(worst["tol"])
        out.append(row("kernel check", f"{op} {dtype} {worst['shape']}",
                       f"max rel err {worst['max_rel_err']} (tol {worst['tol']})", f"{frac:.2f} of tol",
                       all(c["ok"] for c in cs)))
    return out


# ------------------------------------------------------------------------------------------ speed
def kernel_speed_rows(dtype: torch.dtype, device: str = "cuda", latent=LATENT,
                      lora_shapes=LORA_SHAPES) -> tuple[list[dict], dict]:
    """tools/profile.py's timings at one latent and two LoRA shapes, folded to one row per fused op."""
    timings = profile._Timings(dtype, device)
    chw, batch = latent
    timings.latents(chw, batch)
    for label, hidden, r, m in lora_shapes:
        timings.lora(label, hidden, r, m)
    info = timings.info
    out = [row("device", info["device"], f"copy {info['copy_GBps']} GB/s, cuBLAS bf16 {info['cublas_bf16_TFLOPs']} "
               f"TFLOP/s", f"torch {info['torch']}, triton {info['triton']}")]
    for r in timings.rows:
        if r["impl"] != "triton":
            continue
        parts = []
        if "frac_copy_bw" in r:
            parts.append(f"{r['frac_copy_bw']:.2f} of copy BW")
        if "overhead_vs_cublas_linear" in r:
            parts.append(f"{r['overhead_vs_cublas_linear']} over cuBLAS linear")
        for key, name in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "compile")):
            if key in r:
                parts.append(f"{r[key]}x {name}")
        result = f"{r['time_us']} us" + (f", {r['GBps']} GB/s" if "GBps" in r else "")
        out.append(row("kernel speed", f"{r['op']} {r['shape']}", result, "; ".join(parts) + _target(r)))
    return out, info


def _target(r: dict) -> str:
    """`` (target met)`` / `` (target: ...)`` for the ops kernels/README.md sets targets for."""
    if r["op"] == "dmd_score_difference":
        met = r["frac_copy_bw"] >= SCORE_DIFF_BW and r["speedup_vs_eager"] >= SCORE_DIFF_EAGER
        return " (target met)" if met else f" (target: >= {SCORE_DIFF_BW} of copy BW, >= {SCORE_DIFF_EAGER}x eager)"
    if r["op"] == "lora_linear fwd" and "overhead_vs_cublas_linear" in r:
        met = float(r["overhead_vs_cublas_linear"].rstrip("%")) <= 100 * LORA_OVERHEAD
        return " (target met)" if met else f" (target: <= {100 * LORA_OVERHEAD:.0f}%)"
    return ""


# --------------------------------------------------------------------------------------- attention
def wide_denoiser(family: str, device: str, dtype: torch.dtype, width: int = 1536, side: int = 128):
    """A random 2-block transformer of ``family`` as wide as a small real one; latents ``16 x side x side``.

    Returns ``(denoiser, x, t, cond)``: Z-Image's two captions have different lengths, so every
    attention gets a padding mask (what flash-attn's variable-length kernel is for).
    """
    g = torch.Generator().manual_seed(0)
    heads = width // 64 if family == "sd3" else width // 128
    with torch.device(device):
        if family == "sd3":
            from diffusers import SD3Transformer2DModel

            from dmdr.models.sd3 import SD3Denoiser

            net = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=width,
                                        caption_projection_dim=width, pooled_projection_dim=64,
                                        pos_embed_max_size=side, qk_norm="rms_norm")
            denoiser = SD3Denoiser(net)
            cond = {"prompt_embeds": torch.randn(2, 154, width, generator=g).to(device),
                    "pooled_prompt_embeds": torch.randn(2, 64, generator=g).to(device)}
        else:
            from diffusers import ZImageTransformer2DModel

            from dmdr.models.zimage import ZImageDenoiser

            net = ZImageTransformer2DModel(dim=width, n_layers=2, n_refiner_layers=1, n_heads=heads, n_kv_heads=heads,
                                           cap_feat_dim=256, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
            denoiser = ZImageDenoiser(net)
            mask = torch.arange(160)[None] < torch.tensor([[160], [70]])
            cond = {"prompt_embeds": torch.randn(2, 160, 256, generator=g).to(device) * mask[..., None].to(device),
                    "prompt_mask": mask.to(device)}
    denoiser.to(dtype).requires_grad_(False)
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    x = torch.randn(2, 16, side, side, generator=g).to(device=device, dtype=dtype)
    return denoiser, x, torch.tensor([0.3, 0.8], device=device), cond


def attention_rows(bench: Callable, device: str = "cuda", width: int = 1536, side: int = 128) -> list[dict]:
    """Forward + backward of each family's wide transformer, native SDPA against flash-attn."""
    from dmdr.models.attention import INSTALL, resolve_attention

    out = []
    for family in ("sd3", "zimage"):
        denoiser, x, t, cond = wide_denoiser(family, device, torch.bfloat16, width, side)
        xg = x.clone().requires_grad_(True)

        def fwd_bwd(denoiser=denoiser, xg=xg, t=t, cond=cond):
            denoiser(xg, t, cond).float().square().mean().backward()

        flash = resolve_attention("auto", torch.device(device), masked=denoiser.masked_attention)
        results = {}
        for backend in dict.fromkeys(("native", flash)):
            denoiser.set_attention_backend(backend)
            with torch.no_grad():
                results[backend] = denoiser(x, t, cond).float()
            results[backend + " time"] = bench(fwd_bwd, [xg])
        tag = f"{family} 2 blocks, width {width}, {(side // 2) ** 2} image tokens"
        base = results["native time"]
        out.append(row("attention", f"native (SDPA), {tag}", f"{base * 1e3:.2f} ms fwd+bwd"))
        if flash == "native":
            why = "no CUDA" if device != "cuda" else f"flash-attn not installed: {INSTALL}"
            out.append(row("attention", f"flash-attn, {tag}", "not run", why))
            continue
        ref, got = results["native"], results[flash]
        diff = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        t_flash = results[flash + " time"]
        out.append(row("attention", f"{flash}, {tag}", f"{t_flash * 1e3:.2f} ms fwd+bwd",
                       f"{base / t_flash:.2f}x native; max diff {diff:.1e} of max |out|"))
    return out


# --------------------------------------------------------------------------------------- tiny run
def tiny_run_args(out: Path, device: str = "cuda", steps: int = 20) -> list[str]:
    """The tiny recipe's command line for the check: bf16 as users run it, compiled blocks, full AC, attention auto.

    bf16 weights (``model.dtype``; trainable LoRA and full-copy generators keep fp32 masters), bf16 autocast
    (``parallel.param_dtype``), each block compiled inside its activation checkpoint (``parallel.compile``).
    """
    return [sys.executable, str(REPO / "recipes" / "tiny_dmdr.py"), "--train.output_dir", str(out),
            "--train.device", device, "--train.max_steps", str(steps), "--model.dtype", "bf16",
            "--parallel.param_dtype", "bf16", "--parallel.activation_checkpointing", "full",
            "--parallel.compile", "true",
            "--model.attention", "auto", "--log.interval", str(max(1, steps // 4)), "--log.progress_bar", "false",
            "--log.sample_interval", "0", "--checkpoint.interval", "0", "--checkpoint.resume", "never"]


def tiny_run_rows(out: Path, device: str = "cuda", steps: int = 20) -> tuple[list[dict], bool]:
    """Run the tiny recipe in a fresh process (its own peak memory); the last logged interval's numbers."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(tiny_run_args(out, device, steps), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    wall = time.perf_counter() - start
    item = f"recipes/tiny_dmdr.py, {steps} steps, {device}, bf16, compile, AC full"
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return [row("tiny DMDR run", item, f"exit {proc.returncode}", tail[-300:], False)], False
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    marker = "attention backend: "  # dmdr.build.apply_attention's log line
    chosen = [line.split(marker)[1] for line in proc.stderr.splitlines() if marker in line]
    mfu = last.get("perf/mfu")
    skipped = int(last.get("train/skipped_steps", 0))
    result = (f"{1 / last['perf/step_time']:.2f} steps/s, peak {last['perf/peak_memory_gb']:.2f} GB, "
              f"MFU {'n/a (unknown GPU)' if mfu is None else f'{100 * mfu:.2f}%'}, {skipped} non-finite steps skipped")
    ratio = f"steps {last['step'] - steps // 4 + 1}-{last['step']}; {wall:.0f} s wall with start-up"
    backend = chosen[0] if chosen else "(not logged)"
    return [row("tiny DMDR run", item, result, ratio, skipped == 0),
            row("tiny DMDR run", "attention backend chosen by auto", backend)], skipped == 0


# ------------------------------------------------------------------------------------------- main
def cuda_bench(fn, grad_to_none=None) -> float:
    """Median seconds of ``fn`` with ``triton.testing.do_bench`` (as tools/profile.py times)."""
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median") * 1e-3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="folder for the table and the run")
    parser.add_argument("--steps", type=int, default=20, help="generator steps of the tiny DMDR run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if GPU:
        device_name = torch.cuda.get_device_name()
        print(f"GPU: {device_name}; kernel checks, kernel timings, attention backends, a {args.steps}-step DMDR run")
        checks = profile.interpreter_checks("cuda", (torch.bfloat16, torch.float16, torch.float32))
    else:
        device_name = "none (CPU)"
        print("gpu_check needs a CUDA GPU for its timings, attention backends and training run; none here.\n"
              "Running the kernel checks in the Triton interpreter (TRITON_INTERPRET=1, fp32 and fp16) instead.")
        checks = profile.interpreter_checks("cpu")
    rows = kernel_check_rows(checks)
    kernels_ok = all(c["ok"] for c in checks)
    run_ok = True
    if GPU:
        speed, _ = kernel_speed_rows(torch.bfloat16)
        rows += speed
        rows += attention_rows(cuda_bench)
        run_rows, run_ok = tiny_run_rows(args.out / "tiny-run", steps=args.steps)
        rows += run_rows
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = f"gpu_check: {stamp}, GPU {device_name}, commit {source_commit()}, torch {torch.__version__}"
    table = profile.markdown(rows)
    print(f"\n{head}\n\n{table}", end="")
    (args.out / "gpu_check.md").write_text(f"{head}\n\n{table}")
    profile.write(args.out, "gpu_check", rows)
    failed = sum(not c["ok"] for c in checks)
    print(f"\n{len(checks) - failed} kernel checks passed, {failed} failed; {time.perf_counter() - start:.0f} s; "
          f"wrote {args.out}/gpu_check.md")
    if not GPU:
        print("GPU figures: unmeasured (no CUDA device).")
    return 0 if kernels_ok and run_ok else 1


if __name__ == "__main__":
    sys.exit(main())
