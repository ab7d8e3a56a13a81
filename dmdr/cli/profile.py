"""Profile the fused kernels of ``dmdr.kernels`` at the shapes that matter, against torch eager and compile.

    python tools/profile.py --out runs/profile            # GPU: timings; CPU: interpreter checks + bytes

On a CUDA GPU, for every kernel and shape it times Triton, torch eager (the reference) and
``torch.compile`` of the reference with ``triton.testing.do_bench`` (median), measures the device copy
bandwidth and the cuBLAS bf16 matmul rate in the same run, and prints: time, GB/s, fraction of copy
bandwidth, speed-up over eager and over compile, and the LoRA overhead over the plain matmul.

Without a GPU it says so, checks every kernel in the Triton interpreter on small shapes against a
float64 evaluation of the reference, and prints the bytes each op moves, fused against unfused eager
(fused: the kernels' passes, counted analytically; unfused: every aten op of the eager reference,
counted on meta tensors at full size). Every table is also written as CSV and markdown to ``--out``.
Benchmarks report measured ratios; they are never assertions (tests check correctness).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmdr import kernels
from dmdr.devices import DTYPES
from dmdr.kernels import lora_triton

GPU = torch.cuda.is_available()
if not GPU:  # before the first import of a @triton.jit module (dmdr.kernels imports them lazily, on first use)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Latents (C, H, W) and batches: SD3.5-Large and Z-Image share the 16-channel /8 VAE, so 1024 px is
# 16x128x128 for both; Z-Image's 1536 px (16x192x192) is its larger working size.
LATENTS = [("sd35-large/zimage 1024px", (16, 128, 128), (1, 2, 4, 8)),
           ("zimage 1536px", (16, 192, 192), (1, 2, 4))]
# LoRA projections: (label, hidden, ranks, tokens). SD3.5-Large hidden 2432, Z-Image hidden 3840.
LORA = [("sd35-large", 2432, (32, 64), (4096, 8192)), ("zimage", 3840, (32, 64), (4096, 8192))]
ITEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


# ----------------------------------------------------------------------------------------------- bytes
class _ByteCounter(TorchDispatchMode):
    """Sums the bytes every non-view aten op reads and writes (what eager moves through memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    @staticmethod
    def _nbytes(t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None:  # views move nothing
            return out
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        flat_out = torch.utils._pytree.tree_leaves(out)
        self.bytes += sum(map(self._nbytes, flat_in)) + sum(map(self._nbytes, flat_out))
        self.ops += 1
        return out


def eager_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(bytes, aten ops) of one eager call; run it on meta tensors to count at full size for free."""
    with _ByteCounter() as counter:
        fn()
    return counter.bytes, counter.ops


def latent_inputs(batch: int, chw: tuple[int, ...], dtype: torch.dtype, device: str):
    """x0, x_d, v_uncond, v_cond, v_fake, noise and a per-sample t."""
    make = torch.empty if device == "meta" else torch.randn
    t = torch.empty(batch, device=device) if device == "meta" else torch.rand(batch, device=device)
    return [make(batch, *chw, dtype=dtype, device=device) for _ in range(6)], t


def renoise_bytes(n: int, dt: torch.dtype) -> tuple[int, int]:
    """(moved, minimum): read x0 and noise, write x_d (fp32: per-sample fp32 t promotes, as the reference)."""
    moved = n * (2 * ITEM[dt] + 4)
    return moved, moved


def score_difference_bytes(n: int, dt: torch.dtype) -> tuple[int, int]:
    """(moved, minimum): pass 1 reads 5 inputs and writes fp32 d; pass 2 reads d and rewrites it as g."""
    minimum = n * (5 * ITEM[dt] + 4)
    return minimum + n * 8, minimum


def lora_bytes(m: int, k: int, n: int, r: int, dt: torch.dtype) -> tuple[int, int]:
    """(moved, minimum) compulsory traffic of the forward; GEMM tile re-reads hit L2 and are not counted."""
    s = ITEM[dt]
    minimum = (m * k + n * k + r * k + n * r + n + m * n) * s
    return minimum + m * k * s + 2 * m * r * 4, minimum  # x read again by the down kernel; h written, read


def _bytes_row(op, label, shape, dtype, minimum, fused, unfused, ops) -> dict:
    return {"op": op, "model": label, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "MB_min": round(minimum / 1e6, 2), "MB_fused": round(fused / 1e6, 2),
            "MB_unfused_eager": round(unfused / 1e6, 2), "eager_ops": ops,
            "unfused/fused": round(unfused / fused, 2)}


def _latent_byte_rows(label: str, chw: tuple[int, ...], batch: int, dtype: torch.dtype) -> list[dict]:
    (x0, xd, u, c, f, noise), t = latent_inputs(batch, chw, dtype, "meta")
    n = x0.numel()
    shape = f"{batch}x" + "x".join(map(str, chw))
    unfused, ops = eager_bytes(lambda: kernels.renoise_reference(x0, noise, t))
    moved, minimum = renoise_bytes(n, dtype)
    rows = [_bytes_row("renoise", label, shape, dtype, minimum, moved, unfused, ops)]
    unfused, ops = eager_bytes(lambda: kernels.dmd_score_difference_reference(x0, xd, t, u, c, 4.0, f))
    moved, minimum = score_difference_bytes(n, dtype)
    rows.append(_bytes_row("dmd_score_difference", label, shape, dtype, minimum, moved, unfused, ops))
    return rows


def _lora_byte_row(label: str, hidden: int, r: int, m: int, dtype: torch.dtype) -> dict:
    x = torch.empty(m, hidden, dtype=dtype, device="meta")
    w = torch.empty(hidden, hidden, dtype=dtype, device="meta")
    bias = torch.empty(hidden, dtype=dtype, device="meta")
    a = torch.empty(r, hidden, dtype=dtype, device="meta")
    lb = torch.empty(hidden, r, dtype=dtype, device="meta")
    unfused, ops = eager_bytes(lambda: kernels.lora_linear_reference(x, w, bias, a, lb, 1.0))
    moved, minimum = lora_bytes(m, hidden, hidden, r, dtype)
    return _bytes_row("lora_linear fwd", label, f"M{m} D{hidden} r{r}", dtype, minimum, moved, unfused, ops)


def bytes_table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for label, chw, batches in LATENTS:
        for batch in batches:
            rows += _latent_byte_rows(label, chw, batch, dtype)
    for label, hidden, ranks, tokens in LORA:
        for r in ranks:
            for m in tokens:
                rows.append(_lora_byte_row(label, hidden, r, m, dtype))
    return rows


# ---------------------------------------------------------------------------------------------- checks
def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(1.0, ref.abs().max().item())
    return (got.double() - ref.double()).abs().max().item() / scale


# Relative tolerances per input dtype (elementwise ops, lora_linear): a few units of each format's rounding.
TOLERANCES = {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 4e-2)}


def interpreter_checks(device: str, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16)) -> list[dict]:
    """Each kernel on small odd shapes against the reference evaluated in float64 (outputs and grads).

    On CPU the kernels run in the Triton interpreter (fp32 and fp16: it has no bf16); on CUDA compiled.
    """
    previous = os.environ.get("DMDR_KERNELS")
    os.environ["DMDR_KERNELS"] = "triton"
    gen = torch.Generator().manual_seed(0)
    rows = []

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def add(op, shape, dtype, got, ref, tol):
        err = _err(got, ref)
        rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                     "max_rel_err": f"{err:.2e}", "tol": f"{tol:.0e}", "ok": err <= tol})

    try:
        for dtype in dtypes:
            tol, lora_tol = TOLERANCES[dtype]
            shape = (3, 4, 17, 19)
            x0, xd, u, c, f, noise = (rand(*shape, dtype=dtype) for _ in range(6))
            t = torch.rand(3, generator=gen).to(device) * 0.9 + 0.05
            d64 = [a.double() for a in (x0, xd, u, c, f, noise)]
            add("renoise", "3x4x17x19", dtype, kernels.renoise(x0, noise, t),
                kernels.renoise_reference(d64[0], d64[5], t.double()), tol)
            add("dmd_score_difference", "3x4x17x19", dtype,
                kernels.dmd_score_difference(x0, xd, t, u, c, 4.5, f),
                kernels.dmd_score_difference_reference(*d64[:2], t.double(), *d64[2:4], 4.5, d64[4]), tol)
            add("dmd_score_difference_eps", "3x4x17x19", dtype,
                kernels.dmd_score_difference_eps(x0, xd, t, u, c, 4.5, f),
                kernels.dmd_score_difference_eps_reference(*d64[:2], t.double(), *d64[2:4], 4.5, d64[4]), tol)
            x0g = x0.detach().clone().requires_grad_(True)
            kernels.dmd_loss_fused(x0g, xd, t, u, c, 4.5, f).backward()
            x64 = d64[0].clone().requires_grad_(True)
            kernels.dmd_loss_fused_reference(x64, d64[1], t.double(), *d64[2:4], 4.5, d64[4]).backward()
            add("dmd_loss_fused (grad)", "3x4x17x19", dtype, x0g.grad * x0g.numel(), x64.grad * x64.numel(),
                tol)

            m_shape, n, r = (2, 37, 45), 40, 5
            x, w, a, lb = rand(*m_shape), rand(n, 45) / 7, rand(r, 45) / 7, rand(n, r) / 3
            bias = rand(n)
            leaves = [p.to(dtype).requires_grad_(True) for p in (x, w, bias, a, lb)]
            s = torch.tensor([0.5, 2.0], device=device)
            out = kernels.lora_linear(*leaves, s)
            refs = [p.detach().double().requires_grad_(True) for p in leaves]
            ref = kernels.lora_linear_reference(*refs, s.double())
            add("lora_linear", "2x37x45 -> 40, r5", dtype, out, ref, lora_tol)
            dy = rand(*out.shape)
            out.backward(dy.to(dtype))
            ref.backward(dy.double())
            for name, got, want in zip(("x", "W", "b", "A", "B"), leaves, refs):
                add(f"lora_linear d{name}", "2x37x45 -> 40, r5", dtype, got.grad, want.grad, 5 * lora_tol)
    finally:
        if previous is None:
            os.environ.pop("DMDR_KERNELS", None)
        else:
            os.environ["DMDR_KERNELS"] = previous
    return rows


# ---------------------------------------------------------------------------------------------- timing
class _Timings:
    """GPU timings with ``triton.testing.do_bench`` (median); the device's copy and matmul rates first."""

    def __init__(self, dtype: torch.dtype, device: str = "cuda") -> None:
        import triton
        from triton.testing import do_bench

        self.do_bench = do_bench
        self.dtype, self.device, self.rows = dtype, device, []
        dynamo = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):  # one compilation per shape, many shapes
            if hasattr(dynamo, knob):
                setattr(dynamo, knob, 256)
        self.compiled = {n: torch.compile(getattr(kernels, n), dynamic=False)
                         for n in ("renoise_reference", "dmd_score_difference_reference",
                                   "dmd_loss_fused_reference", "lora_linear_reference")}
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
        dst = torch.empty_like(src)
        self.copy_gbs = 2 * src.numel() / self.bench(lambda: dst.copy_(src)) / 1e9
        mm = 8192 if device == "cuda" else 256
        ma = torch.randn(mm, mm, dtype=torch.bfloat16, device=device)
        mm_tflops = 2 * mm**3 / self.bench(lambda: ma @ ma) / 1e12
        name = torch.cuda.get_device_name() if device == "cuda" else device
        self.info = {"device": name, "copy_GBps": round(self.copy_gbs, 1),
                     "cublas_bf16_TFLOPs": round(mm_tflops, 1), "triton": triton.__version__,
                     "torch": torch.__version__}

    def bench(self, fn, grad_to_none=None) -> float:
        return self.do_bench(fn, grad_to_none=grad_to_none, return_mode="median") * 1e-3  # seconds

    def add(self, op, shape, impl, sec, minimum, moved=None, base=None, eager=None, compile_=None, **extra):
        row = {"op": op, "shape": shape, "impl": impl, "time_us": round(sec * 1e6, 1)}
        if moved:  # the bytes this implementation moves (Triton: its passes; eager: its aten ops)
            row["GBps"] = round(moved / sec / 1e9, 1)
            row["frac_copy_bw"] = round(moved / sec / 1e9 / self.copy_gbs, 3)
        if minimum:  # inputs read once, outputs written once: comparable across implementations
            row["eff_GBps"] = round(minimum / sec / 1e9, 1)
        if eager:
            row["speedup_vs_eager"] = round(eager / sec, 2)
        if compile_:
            row["speedup_vs_compile"] = round(compile_ / sec, 2)
        if base:
            row["overhead_vs_cublas_linear"] = f"{100 * (sec / base - 1):.1f}%"
        row.update(extra)
        self.rows.append(row)

    def three_ways(self, op, shape, fused, eager, compiled, moved, minimum, eager_moved, grads=None):
        t_eager, t_comp, t_fused = (self.bench(fn, grads) for fn in (eager, compiled, fused))
        self.add(op, shape, "eager", t_eager, minimum, eager_moved)
        self.add(op, shape, "compile", t_comp, minimum, eager=t_eager)
        self.add(op, shape, "triton", t_fused, minimum, moved, eager=t_eager, compile_=t_comp)

    def latents(self, chw: tuple[int, ...], batch: int) -> None:
        (x0, xd, u, c, f, noise), t = latent_inputs(batch, chw, self.dtype, self.device)
        (m0, md, mu, mc, mf, mn), mt = latent_inputs(batch, chw, self.dtype, "meta")
        n, item = x0.numel(), ITEM[self.dtype]
        shape = f"{batch}x" + "x".join(map(str, chw))
        moved, minimum = renoise_bytes(n, self.dtype)
        self.three_ways("renoise", shape, lambda: kernels.renoise(x0, noise, t),
                        lambda: kernels.renoise_reference(x0, noise, t),
                        lambda: self.compiled["renoise_reference"](x0, noise, t), moved, minimum,
                        eager_bytes(lambda: kernels.renoise_reference(m0, mn, mt))[0])
        moved, minimum = score_difference_bytes(n, self.dtype)
        args = (xd, t, u, c, 4.0, f)
        self.three_ways("dmd_score_difference", shape, lambda: kernels.dmd_score_difference(x0, *args),
                        lambda: kernels.dmd_score_difference_reference(x0, *args),
                        lambda: self.compiled["dmd_score_difference_reference"](x0, *args), moved, minimum,
                        eager_bytes(lambda: kernels.dmd_score_difference_reference(m0, md, mt, mu, mc, 4.0,
                                                                                   mf))[0])
        # The generator's whole chain with its gradient: loss forward, backward into x0 (g / numel).
        xg = x0.clone().requires_grad_(True)
        self.three_ways("dmd_loss fwd+bwd", shape, lambda: kernels.dmd_loss_fused(xg, *args).backward(),
                        lambda: kernels.dmd_loss_fused_reference(xg, *args).backward(),
                        lambda: self.compiled["dmd_loss_fused_reference"](xg, *args).backward(),
                        moved + n * (4 + item), minimum + n * item, None, grads=[xg])

    def lora(self, label: str, hidden: int, r: int, m: int) -> None:
        dtype, device = self.dtype, self.device
        x = torch.randn(m, hidden, dtype=dtype, device=device)
        w = torch.randn(hidden, hidden, dtype=dtype, device=device) / math.sqrt(hidden)
        bias = torch.randn(hidden, dtype=dtype, device=device)
        a = (torch.randn(r, hidden, dtype=dtype, device=device) / math.sqrt(hidden)).requires_grad_(True)
        lb = (torch.randn(hidden, r, dtype=dtype, device=device) / math.sqrt(r)).requires_grad_(True)
        no_lora = torch.empty(m, 0, dtype=torch.float32, device=device)
        shape = f"{label} M{m} D{hidden} r{r}"
        moved, minimum = lora_bytes(m, hidden, hidden, r, dtype)
        flops = 2 * m * hidden * hidden
        with torch.no_grad():
            t_base = self.bench(lambda: torch.nn.functional.linear(x, w, bias))
            t_tbase = self.bench(lambda: lora_triton.lora_matmul(x, w, bias, no_lora, lb, dtype))
            t_eager = self.bench(lambda: kernels.lora_linear_reference(x, w, bias, a, lb, 0.7))
            t_comp = self.bench(lambda: self.compiled["lora_linear_reference"](x, w, bias, a, lb, 0.7))
            t_fused = self.bench(lambda: kernels.lora_linear(x, w, bias, a, lb, 0.7))
        self.add("linear fwd", shape, "cublas (no LoRA)", t_base, 0, TFLOPs=round(flops / t_base / 1e12, 1))
        self.add("linear fwd", shape, "triton (no LoRA)", t_tbase, 0, base=t_base,
                 TFLOPs=round(flops / t_tbase / 1e12, 1))
        self.add("lora_linear fwd", shape, "eager (peft-style)", t_eager, minimum, base=t_base)
        self.add("lora_linear fwd", shape, "compile", t_comp, minimum, base=t_base, eager=t_eager)
        self.add("lora_linear fwd", shape, "triton", t_fused, minimum, moved, base=t_base, eager=t_eager,
                 compile_=t_comp, overhead_vs_triton_linear=f"{100 * (t_fused / t_tbase - 1):.1f}%")
        # Forward + backward: the critic trains A and B; x needs its gradient for the layers before.
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(m, hidden, dtype=dtype, device=device)
        grads = [xg, a, lb]
        t_base = self.bench(lambda: torch.nn.functional.linear(xg, w, bias).backward(dy), grads)
        t_eager = self.bench(lambda: kernels.lora_linear_reference(xg, w, bias, a, lb, 0.7).backward(dy),
                             grads)
        t_fused = self.bench(lambda: kernels.lora_linear(xg, w, bias, a, lb, 0.7).backward(dy), grads)
        self.add("lora_linear fwd+bwd", shape, "cublas linear (no LoRA)", t_base, 0)
        self.add("lora_linear fwd+bwd", shape, "eager (peft-style)", t_eager, 0, base=t_base)
        self.add("lora_linear fwd+bwd", shape, "triton", t_fused, 0, base=t_base, eager=t_eager)


def gpu_timings(dtype: torch.dtype, quick: bool, device: str = "cuda") -> tuple[list[dict], dict]:
    """Every op at every shape; ``device`` is a parameter only so the table code can be dry-run on CPU."""
    timings = _Timings(dtype, device)
    for _, chw, batches in LATENTS[:1] if quick else LATENTS:
        for batch in batches:
            timings.latents(chw, batch)
    for label, hidden, ranks, tokens in LORA[:1] if quick else LORA:
        for r in ranks:
            for m in tokens:
                timings.lora(label, hidden, r, m)
    return timings.rows, timings.info


# ---------------------------------------------------------------------------------------------- output
def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/profile"), help="folder for CSV and markdown")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="GPU timing dtype")
    parser.add_argument("--quick", action="store_true", help="GPU: SD3.5-Large shapes only")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections: list[tuple[str, list[dict]]] = []

    if GPU:
        print(f"GPU: {torch.cuda.get_device_name()}; checking kernels on small shapes first")
    else:
        print("No CUDA GPU on this machine: timings skipped (the README targets need a GPU).\n"
              "Checking every kernel in the Triton interpreter (TRITON_INTERPRET=1) on small shapes instead,"
              "\n"
              "and counting the bytes each op moves at the real shapes, fused against unfused eager.")
    checks = interpreter_checks("cuda", (torch.float32, torch.float16, torch.bfloat16)) if GPU else \
        interpreter_checks("cpu")
    sections.append(("Correctness checks (" + ("CUDA" if GPU else "Triton interpreter, CPU") + ")", checks))
    sections.append((f"Bytes moved per call ({args.dtype}), fused vs unfused eager", bytes_table(dtype)))
    if GPU:
        timings, info = gpu_timings(dtype, args.quick)
        sections.append(("Device (measured in this run)", [info]))
        sections.append((f"Timings ({args.dtype}, do_bench median)", timings))

    report = ["# dmdr kernel profile", ""]
    for title, rows in sections:
        print(f"\n== {title}\n{markdown(rows)}", end="")
        report += [f"## {title}", "", markdown(rows)]
        write(args.out, title.split(" (")[0].split(",")[0].lower().replace(" ", "_"), rows)
    (args.out / "profile.md").write_text("\n".join(report))
    failed = [r for r in checks if not r["ok"]]
    print(f"\nwrote {args.out}/profile.md and CSVs in {time.perf_counter() - start:.1f}s; "
          f"{len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
