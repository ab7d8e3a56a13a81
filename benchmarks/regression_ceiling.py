"""Issue 23: is the N-step student's plateau a limit of DMD, or of an N-step copy of this teacher?

    python benchmarks/regression_ceiling.py NAME --num-steps 4 --steps 600 --every 150 [--pairs 2048] [--seed 0]

The N-step student is trained to reproduce the teacher's 25-step CFG 3 map *exactly*: for a pool of fixed
(prompt, noise) pairs the target is the teacher's own sample from that noise, and the loss is the mean squared
latent error of the student's deterministic few-step sample (Euler, ``ode``: what the demo and every table score)
from the same noise, back-propagated through all N steps. Paired regression has no critic, no mode-seeking and no
distribution to match: it measures how close an N-step network of this architecture, started from the teacher as
every DMD run is, gets to the teacher's samples on held-out prompts. If it plateaus where DMD does, the gap is the
few-step copy's; if it reaches the teacher, the gap is DMD's.

Same protocol as ``benchmarks/recipe_search.py`` (all 172 held-out prompts x noise draws 0, 1, mean over the
draws); one JSON line per scored step in ``runs/regression-ceiling/NAME/scores.jsonl``. Full copy of the
teacher's transformer, AdamW (lr ``--lr``), per-step batch ``--batch``, one thread.
"""
import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from dmdr.models import load_backbone
from dmdr.models.base import cat_conditioning, repeat_conditioning
from dmdr.sampling import few_step_sample, teacher_sample
from dmdr.schedules import few_step_timesteps
from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH
from dmdr.worlds.shapes.scene import IMAGE_SIZE, split_prompts

REPO = Path(__file__).resolve().parent.parent
TEACHER_GUIDANCE, TEACHER_STEPS = 3.0, 25  # the demo's reference row
POOL_NOISE_SEED = 2_000_003  # apart from the evaluation's noise draws 0, 1


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--num-steps", type=int, default=4, help="N, the student's steps (shift 1, t_min 0.001)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=150)
    p.add_argument("--pairs", type=int, default=2048, help="(train prompt, noise) pairs in the pool")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=str(REPO / "assets" / "shapes-teacher"))
    return p.parse_args()


@torch.no_grad()
def teacher_pool(backbone, prompts: list[str], noise: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    negative = backbone.text_encoder.negative()
    out = []
    for i in range(0, len(prompts), chunk):
        cond = backbone.text_encoder.encode(prompts[i:i + chunk])
        n = len(prompts[i:i + chunk])
        out.append(teacher_sample(backbone.teacher, noise[i:i + n], cond, repeat_conditioning(negative, n),
                                  backbone.parameterization, TEACHER_GUIDANCE, num_steps=TEACHER_STEPS, shift=1.0))
    return torch.cat(out)


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    run = REPO / "runs" / "regression-ceiling" / a.name
    run.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(a.teacher, dtype=torch.float32, max_sequence_length=MAX_SEQUENCE_LENGTH)
    rng = random.Random(a.seed)
    train = split_prompts("train")
    prompts = [rng.choice(train) for _ in range(a.pairs)]
    noise = torch.randn((a.pairs, *backbone.latent_shape(IMAGE_SIZE)),
                        generator=torch.Generator().manual_seed(POOL_NOISE_SEED + a.seed))
    t0 = time.time()
    pool = run.parent / f"pool-seed{a.seed}-{a.pairs}.pt"  # the teacher's samples: shared by runs of one seed
    if pool.is_file():
        targets = torch.load(pool, weights_only=True)
    else:
        targets = teacher_pool(backbone, prompts, noise)
        torch.save(targets, pool.with_suffix(".tmp"))
        pool.with_suffix(".tmp").rename(pool)
    pool_s = time.time() - t0
    with torch.no_grad():
        conds = [backbone.text_encoder.encode([p]) for p in prompts]
    student = copy.deepcopy(backbone.teacher)
    student.requires_grad_(True)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    timesteps = few_step_timesteps(a.num_steps, 1.0, 0.001)
    sampler = Sampler("few_step", a.num_steps, 1.0, 1.0, 0.001, "ode")
    order = torch.Generator().manual_seed(a.seed)
    train_s = 0.0
    out = run / "scores.jsonl"

    def score(step: int) -> None:
        student.eval()
        row = evaluate_model(backbone, student, sampler, split_prompts("heldout"), [0, 1], IMAGE_SIZE)
        student.train()
        rec = {"name": a.name, "seed": a.seed, "num_steps": a.num_steps, "step": step, "pairs": a.pairs,
               "lr": a.lr, "batch": a.batch, "pool_s": round(pool_s), "train_s": round(train_s),
               **{k: round(v["mean"], 4) for k, v in row["scores"].items()}}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    score(0)
    for step in range(1, a.steps + 1):
        t1 = time.time()
        idx = torch.randint(a.pairs, (a.batch,), generator=order).tolist()
        cond = cat_conditioning([conds[i] for i in idx])
        sample = few_step_sample(student, noise[idx], cond, timesteps, backbone.parameterization, mode="ode")
        loss = ((sample - targets[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.time() - t1
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} ({train_s / step:.2f} s/step)", flush=True)
        if step % a.every == 0:
            score(step)


if __name__ == "__main__":
    main()
