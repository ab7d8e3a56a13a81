"""Issue 23's recipe search: train recipes/shapes_dmdr.py at W=1 and score every checkpoint on one fixed protocol.

    python benchmarks/recipe_search.py NAME --steps 300 --every 60 --seed 0 [--resume CKPT] [--weights trained,ema] \
        -- --dmd.ratio 5 ...

Fixed protocol: every held-out prompt (172) x noise draws 0,1, few-step sampler; mean over draws.
Appends one JSON line per (step, weights) to runs/recipe-search/NAME/scores.jsonl and prints it.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--every", type=int, default=60)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--resume", default="")
p.add_argument("--weights", default="trained")
p.add_argument("--cold", type=int, default=60)
p.add_argument("--noise", type=int, default=2)
p.add_argument("--modes", default="ode")
p.add_argument("--score-only", action="store_true")
a, rest = p.parse_known_args()
a.overrides = [x for x in rest if x != "--"]
run = REPO / "runs" / "recipe-search" / a.name
run.mkdir(parents=True, exist_ok=True)
prompts = REPO / "runs" / "recipe-search" / "prompts.txt"
if not prompts.exists():
    from dmdr.worlds.shapes.scene import split_prompts
    prompts.write_text("\n".join(split_prompts("train")) + "\n")
argv = [sys.executable, str(REPO / "recipes" / "shapes_dmdr.py"), "--data.sources", str(prompts),
        "--train.output_dir", str(run), "--train.seed", str(a.seed), "--train.max_steps", str(a.steps),
        "--checkpoint.interval", str(a.every), "--checkpoint.keep_last", "1000", "--log.sample_interval", "0",
        "--log.progress_bar", "false", "--log.tensorboard", "false", "--log.interval", "5",
        "--dynamic.decay_steps", str(a.cold), "--rl.start_step", str(a.cold), *a.overrides]
if a.resume and not (run / "checkpoints" / "latest").exists():
    argv += ["--checkpoint.resume", a.resume]
env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
t0 = time.time()
if not a.score_only:
    with open(run / "train.log", "a") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        sys.exit(f"{a.name}: training failed, see {run}/train.log")
train_s = time.time() - t0
import torch  # noqa: E402

torch.set_num_threads(1)
import diffusers  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
diffusers.utils.logging.disable_progress_bar()
from dmdr.export import load_generator, read_run_config, resolve_checkpoint  # noqa: E402
from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model  # noqa: E402
from dmdr.worlds.shapes.scene import split_prompts  # noqa: E402

cfg = read_run_config(run)
done = set()
out = run / "scores.jsonl"
if out.exists():
    done = {(r["step"], r["weights"], r.get("mode", "ode")) for r in map(json.loads, out.read_text().splitlines())}
steps = sorted(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*"))
for step in steps:
    for w, mode in [(w, m) for w in a.weights.split(",") for m in a.modes.split(",")]:
        if (step, w, mode) in done:
            continue
        loaded = load_generator(cfg, resolve_checkpoint(run, step), device="cpu", dtype=torch.float32, weights=w)
        sampler = Sampler("few_step", cfg.dmd.num_steps, 1.0, cfg.dmd.shift, cfg.dmd.t_min, mode)
        row = evaluate_model(loaded.backbone, loaded.roles.generator_fn, sampler, split_prompts("heldout"),
                             list(range(a.noise)), cfg.model.resolution)
        rec = {"name": a.name, "seed": a.seed, "step": step, "weights": w, "mode": mode, "train_s": round(train_s),
               **{k: round(v["mean"], 4) for k, v in row["scores"].items()}}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
