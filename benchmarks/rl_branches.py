"""Compute and memory of each RL branch per generator step, as ratios to ReFL, measured in one run (CPU, W=1).

    python benchmarks/rl_branches.py [--mode lora|full] [--steps 3]

For ``--rl.method`` refl, dpo and grpo (and ``none``, DMD alone) on the tiny SD3 pipeline, through the
real trainer (:func:`dmdr.build.build_run`), RL on from step 0 and one generator step per iteration:

* generator forwards per generator step, with grad and without (calls and samples: a call over a
  batch of ``n`` samples counts ``n``), and critic (teacher) forwards; the backward simulation is
  included (every iteration runs it);
* extra copies of the generator's trainable weights the branch keeps (DPO's frozen reference: the
  adapter in LoRA mode, the whole generator in full mode) and the bytes of GRPO's kept group;
* peak host RSS growth over the measured generator steps (the kernel's high-water mark, reset first;
  see ``benchmarks/memory.py``) and the step time, each branch in a fresh process.

Per-rank batch 4 prompts, ``dpo_k`` 4, ``grpo_group_size`` 4, 4 sampler steps, fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory import PeakRSS  # benchmarks/memory.py: this folder is first on sys.path when run

from dmdr.recipes.tiny_dmdr import DEMO_PROMPTS, tiny_dmdr

METHODS = ("none", "refl", "dpo", "grpo")


def _count(fn, counts: dict[str, int], key: str):
    def counted(x, *args, **kwargs):
        mode = "grad" if torch.is_grad_enabled() else "nograd"
        counts[f"{key}_{mode}_calls"] = counts.get(f"{key}_{mode}_calls", 0) + 1
        counts[f"{key}_{mode}_samples"] = counts.get(f"{key}_{mode}_samples", 0) + x.shape[0]
        return fn(x, *args, **kwargs)

    return counted


def _measure(method: str, mode: str, steps: int, root: Path) -> dict:
    from dmdr.build import build_run
    from dmdr.config import apply_overrides
    from dmdr.models.tiny import build_tiny_sd3

    torch.set_num_threads(1)
    model = root / "tiny-sd3"
    if not (model / "model_index.json").exists():
        build_tiny_sd3(model, seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(DEMO_PROMPTS) + "\n")
    out = root / f"run-{method}-{mode}"
    cfg = apply_overrides(tiny_dmdr(), [
        "--model.path", str(model), "--data.sources", str(prompts), "--train.output_dir", str(out),
        "--rl.method", method if method != "none" else "refl", "--rl.start_step", "0" if method != "none" else "999",
        "--dmd.ratio", "1", "--data.batch_size", "4", "--data.rl_batch_size", "4", "--rl.dpo_k", "4",
        "--rl.grpo_group_size", "4", "--model.generator_mode", mode, "--log.tensorboard", "false",
        "--log.progress_bar", "false", "--checkpoint.interval", "0", "--train.max_steps", "100"])
    session = build_run(cfg)
    trainer = session.trainer
    trainer.train_iteration()  # warm-up: lazy imports, allocator, the reference snapshot
    counts: dict[str, int] = {}
    trainer.roles.generator_fn = _count(trainer.roles.generator_fn, counts, "generator")
    trainer.roles.critic_fn = _count(trainer.roles.critic_fn, counts, "critic")
    with PeakRSS() as peak:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_iteration()
        elapsed = (time.perf_counter() - start) / steps
    gen_bytes = sum(p.numel() * p.element_size() for p in trainer.roles.generator_params)
    reference, rl = trainer.engine.reference, trainer.engine.rl
    ref_bytes = sum(v.numel() * v.element_size() for v in reference.values) if reference else 0
    group_bytes = 0
    if rl is not None and rl.stateful and getattr(rl, "group", None):
        group = rl.group
        tensors = [*group["states"], group["old_log_probs"], group["advantages"], *group["cond"].values()]
        group_bytes = sum(t.numel() * t.element_size() for t in tensors)
    session.close()
    return {"method": method, "mode": mode, **{k: v / steps for k, v in counts.items()},
            "trainable_mb": gen_bytes / 2**20, "extra_copies": ref_bytes / gen_bytes, "group_mb": group_bytes / 2**20,
            "peak_rss_mb": peak.growth / 2**20, "step_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", default="")
    ap.add_argument("--root", default="")
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_measure(args.worker, args.mode, args.steps, Path(args.root))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:  # a fresh process each: one branch's freed memory cannot hide the next's growth
            proc = subprocess.run([sys.executable, __file__, "--worker", method, "--mode", args.mode, "--steps",
                                   str(args.steps), "--root", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            rows.append(json.loads(next(line for line in proc.stdout.splitlines()
                                        if line.startswith("RESULT "))[len("RESULT "):]))
    base = next(r for r in rows if r["method"] == "refl")
    print(f"RL branches per generator step, tiny SD3, generator {args.mode}, batch 4, K = G = 4, N = 4 "
          "(ratios to ReFL)")
    head = ["method", "gen fwd grad", "gen fwd no-grad", "critic fwd", "samples x ReFL", "extra copies (MB)",
            "group MB", "peak RSS x ReFL", "step time x ReFL"]
    print(" | ".join(head))
    for r in rows:
        samples = sum(v for k, v in r.items() if k.endswith("_samples"))
        base_samples = sum(v for k, v in base.items() if k.endswith("_samples"))
        print(" | ".join([
            r["method"],
            f"{r.get('generator_grad_calls', 0):.0f} ({r.get('generator_grad_samples', 0):.0f})",
            f"{r.get('generator_nograd_calls', 0):.0f} ({r.get('generator_nograd_samples', 0):.0f})",
            f"{r.get('critic_grad_calls', 0) + r.get('critic_nograd_calls', 0):.0f} "
            f"({r.get('critic_grad_samples', 0) + r.get('critic_nograd_samples', 0):.0f})",
            f"{samples / base_samples:.2f}", f"{r['extra_copies']:.2f} ({r['extra_copies'] * r['trainable_mb']:.3f})",
            f"{r['group_mb']:.3f}",
            f"{r['peak_rss_mb'] / max(base['peak_rss_mb'], 1e-9):.2f}", f"{r['step_s'] / base['step_s']:.2f}"]))
    print("(calls per generator step, samples in parentheses; critic = the teacher with the critic LoRA; extra copies "
          "of the generator's trainable weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
