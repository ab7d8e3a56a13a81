"""Real size, once: one DMDR generator step of SD3-Medium (2B) at 512 px under FSDP2, on CPU, in bf16.

    python benchmarks/real_size.py --out runs/real-size [--critic-steps 1] [--num-steps 1] [--world 2]

What it builds (no download): the SD3-Medium pipeline folder from the planner's shipped configs
(``dmdr/planning/configs/sd3-medium``) with random weights (the transformer as sharded bf16 safetensors,
the VAE), and an embedding cache of random T5/CLIP-shaped prompt embeddings (``data.embedding_cache``), so no
text encoder is loaded, as a user's cached run. Then ``torchrun --nproc_per_node=W`` runs the SD3-Medium
recipe (``recipes/sd3m_dmdr.py``) through the real entry point on that folder: the teacher built on the meta
device and materialised shard by shard, LoRA generator and the shared critic LoRA, bf16 weights and
mixed precision, full activation checkpointing, batch 1 per rank, one generator step plus its critic steps
(``--critic-steps``, the recipe's ``dmd.ratio``; the paper's 5 by default is hours on 2 cores).

It reports, per rank, the peak resident memory against ``tools/plan.py``'s prediction for the same setting
(the planner predicts accelerator memory: model states, activations, FSDP buffers; the host process adds the
Python runtime and libraries, measured here as the resident size before the model is built), and where the
step's time goes (backward simulation, critic steps, generator forward, the teacher's score pass, the
generator's backward and optimizer step). Results go to ``<out>/real_size.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "dmdr" / "planning" / "configs" / "sd3-medium"
PROMPTS = ["a photo of a cat", "a red car in the rain", "an astronaut riding a horse", "a bowl of fruit",
           "a lighthouse at dusk", "a watercolor of a fox", "a city skyline at night", "a snowy mountain"]
SHARD_BYTES = 2 * 2**30


# ----------------------------------------------------------------------------------------- the model folder
def _random_init(name: str, shape, generator):
    import torch

    if len(shape) >= 2:  # small weights keep 24 random blocks finite (the numbers are not the point)
        return torch.randn(shape, generator=generator) * 0.02
    return torch.ones(shape) if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") \
        else torch.zeros(shape)


def make_model_folder(folder: Path, seed: int = 0) -> Path:
    """SD3-Medium's folder with random weights: configs from the planner, transformer shards, VAE, scheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import save_file

    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(CONFIGS, folder)
    g = torch.Generator().manual_seed(seed)
    config = SD3Transformer2DModel.load_config(folder / "transformer")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SD3Transformer2DModel.from_config(config).state_dict().items()}
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    size = 0
    for name, shape in shapes.items():
        t = _random_init(name, shape, g).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES and shard:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
    shards.append(shard)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / "transformer" / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * 2 for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    del shards, shard
    torch.manual_seed(seed)
    AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    done.write_text("random weights\n")
    return folder


class RandomSD3Embeddings:
    """What the SD3 text encoder returns (CLIP-L/G hidden states + T5-XXL, pooled CLIP), random, in bf16."""

    def __init__(self, max_sequence_length: int, seed: int = 0):
        import torch

        self.tokens, self.g = 77 + max_sequence_length, torch.Generator().manual_seed(seed)

    def encode(self, prompts: list[str]) -> dict:
        import torch

        n = len(prompts)
        return {"prompt_embeds": torch.randn(n, self.tokens, 4096, generator=self.g).to(torch.bfloat16),
                "pooled_prompt_embeds": torch.randn(n, 2048, generator=self.g).to(torch.bfloat16)}

    def negative(self) -> dict:
        return self.encode([""])


def make_cache(out: Path, max_sequence_length: int) -> tuple[Path, Path]:
    from dmdr.config import DataConfig
    from dmdr.data.cache import cache_embeddings

    prompts = out / "prompts.txt"
    cache = out / "embedding-cache"
    if not (cache / "cache.json").exists():
        prompts.write_text("\n".join(PROMPTS) + "\n")
        shutil.rmtree(cache, ignore_errors=True)
        cache_embeddings(DataConfig(sources=(str(prompts),)), RandomSD3Embeddings(max_sequence_length), cache)
    return prompts, cache


# ----------------------------------------------------------------------------------------- the run
def run_overrides(args: argparse.Namespace, folder: Path, prompts: Path, cache: Path) -> list[str]:
    return ["--model.path", str(folder), "--model.dtype", "bf16", "--model.resolution", str(args.resolution),
            "--parallel.param_dtype", "bf16", "--parallel.activation_checkpointing", "full",
            "--data.sources", str(prompts), "--data.embedding_cache", str(cache), "--data.num_workers", "0",
            "--data.batch_size", "1", "--data.rl_batch_size", "1", "--dmd.ratio", str(args.critic_steps),
            "--dmd.num_steps", str(args.num_steps), "--rl.method", "none", "--train.max_steps", "1",
            "--train.device", "cpu", "--train.output_dir", str(args.out / "run"), "--checkpoint.resume", "never",
            "--checkpoint.interval", "0", "--log.interval", "1", "--log.progress_bar", "false",
            "--log.tensorboard", "false", "--log.sample_interval", "0"]


def recipe_config(overrides: list[str]):
    from dmdr.config import apply_overrides
    from dmdr.recipes.sd3m_dmdr import sd3m_dmdr

    return apply_overrides(sd3m_dmdr(), overrides)


PHASES = {
    "backward_simulate": "backward simulation (generator sampler, no grad)",
    "critic_update": "critic steps (forward, AC recompute, backward, AdamW)",
    "generator_clean_estimate": "generator forward (with grad)",
    "dmd_generator_loss": "teacher score pass (3x batch, no grad) + DMD loss",
    "_next_batch": "data (embedding cache)",
}


def worker(args: argparse.Namespace) -> int:
    """One rank: time the trainer's phases while the recipe's real entry point runs."""
    import torch

    torch.set_num_threads(args.threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import dmdr.engine as engine_module
    import dmdr.trainer as trainer_module
    from dmdr.launch import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s dmdr %(levelname)s %(message)s")
    spent: dict[str, float] = defaultdict(float)
    rank = int(os.environ.get("RANK", "0"))

    def record(code: int | None, total: float | None) -> None:
        """This rank's numbers so far (rewritten after every phase: a run stopped midway still tells)."""
        stats = {"rank": rank, "exit": code, "seconds_total": total, "seconds": dict(spent),
                 "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                 "rss_before_build_gb": rss_start, "threads": args.threads}
        (args.out / f"rank{rank}.json").write_text(json.dumps(stats, indent=1))

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
                record(None, None)
        return wrapper

    # The step engine calls the algorithm's functions by the names it imported; the trainer feeds it batches.
    # A name that is gone is an error here, not a phase silently timed at zero.
    for owner, keys in ((engine_module, ("backward_simulate", "generator_clean_estimate", "dmd_generator_loss")),
                        (engine_module.StepEngine, ("critic_update", "generator_update")),
                        (trainer_module.DMDRTrainer, ("_next_batch", "train_iteration"))):
        for key in keys:
            setattr(owner, key, timed(key, getattr(owner, key)))
    folder, prompts, cache = Path(args.folder), Path(args.prompts), Path(args.cache)
    t0 = time.perf_counter()
    code = run(recipe_config(run_overrides(args, folder, prompts, cache)))
    record(code, time.perf_counter() - t0)
    return code


def predicted(args: argparse.Namespace, folder: Path, prompts: Path, cache: Path) -> dict:
    """tools/plan.py's per-rank memory for the same setting (cold-start stage)."""
    from dmdr.gpus import get_gpu
    from dmdr.planning import make_plan

    cfg = recipe_config(run_overrides(args, folder, prompts, cache))
    result = make_plan(cfg, "h100-80", get_gpu("h100-80"), args.world, recipe="sd3m_dmdr", model=str(folder))
    stage = result.plan.stages[0]
    return {"peak_gb": stage.peak / 2**30, "static_gb": stage.static / 2**30,
            "items_gb": {k: v / 2**30 for k, v in stage.items.items()},
            "activations_gb": {k: v / 2**30 for k, v in stage.activations.items()}}


def report(args: argparse.Namespace, plan: dict, ranks: list[dict], wall: float, command: str) -> str:
    lines = [f"# Real size: SD3-Medium, {args.resolution} px, W={args.world} FSDP2 on CPU, bf16, full AC",
             "", f"Command: `{command}` ({wall / 60:.1f} min wall in all)", "",
             f"One generator step with {args.critic_steps} critic step(s), {args.num_steps}-step generator, batch 1 "
             f"per rank, LoRA generator + shared critic LoRA, {args.threads} thread(s) per rank.", "",
             "| rank | peak RSS (GB) | RSS before build (GB) | RSS - before | planned peak (GB) |",
             "|---|---|---|---|---|"]
    for r in ranks:
        lines.append(f"| {r['rank']} | {r['peak_rss_gb']:.2f} | {r['rss_before_build_gb']:.2f} | "
                     f"{r['peak_rss_gb'] - r['rss_before_build_gb']:.2f} | {plan['peak_gb']:.2f} |")
    lines += ["", "Planned, per rank: " + ", ".join(f"{k} {v:.2f}" for k, v in plan["items_gb"].items() if v)
              + "; activations " + ", ".join(f"{k} {v:.2f}" for k, v in plan["activations_gb"].items()) + " (GB)",
              "", "| where the step's time goes (rank 0) | seconds | share |", "|---|---|---|"]
    r0 = ranks[0]
    s = r0["seconds"]
    step = s.get("train_iteration", 0.0)
    rows = [(PHASES[k], s.get(k, 0.0)) for k in ("_next_batch", "backward_simulate", "critic_update",
                                                  "generator_clean_estimate", "dmd_generator_loss")]
    gen_rest = s.get("generator_update", 0.0) - s.get("generator_clean_estimate", 0.0) - s.get("dmd_generator_loss",
                                                                                               0.0)
    rows.append(("generator backward (AC recompute), clip, AdamW", gen_rest))
    rows.append(("rest of the iterations", step - sum(v for _, v in rows)))
    for name, sec in rows:
        lines.append(f"| {name} | {sec:.1f} | {sec / step:.0%} |" if step else f"| {name} | {sec:.1f} | |")
    lines += [f"| all training iterations | {step:.1f} | 100% |",
              f"| start-up (build, load, shard) + checkpoint | {r0['seconds_total'] - step:.1f} | |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real-size"))
    parser.add_argument("--world", type=int, default=2, help="FSDP2 ranks (processes)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--critic-steps", type=int, default=1, help="critic steps per generator step (dmd.ratio)")
    parser.add_argument("--num-steps", type=int, default=1, help="the generator's sampling steps (dmd.num_steps)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.worker:
        return worker(args)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_model_folder(args.out / "sd3-medium-random")
    max_len = recipe_config([]).model.max_sequence_length
    prompts, cache = make_cache(args.out, max_len)
    plan = predicted(args, folder, prompts, cache)
    print(f"planned peak per rank: {plan['peak_gb']:.2f} GB; starting {args.world} ranks", flush=True)
    for f in args.out.glob("rank*.json"):
        f.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}",
           str(Path(__file__).resolve()), "--worker", "--out", str(args.out), "--folder", str(folder),
           "--prompts", str(prompts), "--cache", str(cache), "--resolution", str(args.resolution),
           "--critic-steps", str(args.critic_steps), "--num-steps", str(args.num_steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO)
    ranks = [json.loads((args.out / f"rank{r}.json").read_text()) for r in range(args.world)
             if (args.out / f"rank{r}.json").exists()]
    if proc.returncode != 0 or len(ranks) != args.world:
        print(f"error: the run exited {proc.returncode} ({len(ranks)} of {args.world} ranks reported)",
              file=sys.stderr)
        return 1
    shown = "python benchmarks/real_size.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = report(args, plan, ranks, time.perf_counter() - start, shown.strip())
    (args.out / "real_size.md").write_text(text)
    (args.out / "real_size.json").write_text(json.dumps({"plan": plan, "ranks": ranks}, indent=1))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
