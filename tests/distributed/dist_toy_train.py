"""A toy training loop wired to dmdr.distributed the way the DMDR trainer is; run by test_dist_faults.py
under ``torchrun --standalone --nproc_per_node=2 -m tests.distributed.dist_toy_train`` (the repo on ``PYTHONPATH``).

Fault injection (first attempt only, ``TORCHELASTIC_RESTART_COUNT == 0``): ``--crash-at K`` kills rank 1
at step K; ``--signal-at K`` SIGTERMs rank 0 in the middle of step K; ``--nan-at`` makes rank 1's loss
non-finite at the listed steps.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dmdr.config import ParallelConfig
from dmdr.distributed import (
    CheckpointManager,
    ModelOptimizerState,
    PreemptionHandler,
    RNGState,
    all_finite,
    build_mesh,
    collect_released_objects,
    init_distributed,
    parallelize_denoiser,
)
from tests.distributed.dist_toy import full_params, toy_batch, toy_model


class Counters:
    def __init__(self) -> None:
        self.step = self.skipped = self.consecutive_bad = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "skipped": self.skipped, "consecutive_bad": self.consecutive_bad}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.skipped = state["step"], state["skipped"]
        self.consecutive_bad = state["consecutive_bad"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--max-bad", type=int, default=3)
    ap.add_argument("--crash-at", type=int, default=-1)
    ap.add_argument("--signal-at", type=int, default=-1)
    ap.add_argument("--nan-at", type=str, default="")
    args = ap.parse_args()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    nan_at = {int(s) for s in args.nan_at.split(",") if s}
    torch.set_num_threads(1)

    env = init_distributed(device="cpu")
    mesh = build_mesh(ParallelConfig(), env.world_size)
    model = toy_model(lora=False)
    parallelize_denoiser(model, mesh, ParallelConfig(param_dtype="fp32"), trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    counters = Counters()
    rng = torch.Generator().manual_seed(100 + env.rank)
    app = {"model": ModelOptimizerState(model, opt), "trainer": counters, "rng": RNGState({"noise": rng})}
    ckpt = CheckpointManager(args.out, keep_last=2, env=env)
    resumed = ckpt.resume(app, "auto")
    print(f"rank {env.rank} resumed from {resumed}", flush=True)

    with PreemptionHandler(env) as preempt:
        while counters.step < args.steps:
            k = counters.step
            if first_attempt and env.rank == 1 and k == args.crash_at:
                os._exit(17)
            if first_attempt and env.rank == 0 and k == args.signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step still completes
            x, t, cond, target = toy_batch(k)
            n = x.shape[0] // env.world_size
            sl = slice(env.rank * n, (env.rank + 1) * n)
            x = x[sl] + 0.01 * torch.randn(x[sl].shape, generator=rng)
            loss = F.mse_loss(model(x, t[sl], {"emb": cond["emb"][sl]}), target[sl])
            if k in nan_at and env.rank == 1:
                loss = loss * float("nan")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if all_finite(loss, params, env):
                opt.step()
                counters.consecutive_bad = 0
            else:
                counters.skipped += 1
                counters.consecutive_bad += 1
                if counters.consecutive_bad >= args.max_bad:
                    print(f"rank {env.rank}: {counters.consecutive_bad} consecutive non-finite steps at step "
                          f"{k}; stopping (the last good checkpoint is intact)", flush=True)
                    env.destroy()
                    return 3
            opt.zero_grad(set_to_none=True)
            counters.step += 1
            stop = preempt.should_stop()
            last = counters.step == args.steps
            if stop or last or (args.interval and counters.step % args.interval == 0):
                ckpt.save(counters.step, app, final=stop or last)
            if stop:
                print(f"rank {env.rank} preempted after step {counters.step}", flush=True)
                break
    ckpt.close()
    if counters.step == args.steps:
        full = full_params(model)
        if env.is_main:
            torch.save({"params": full, "skipped": counters.skipped}, Path(args.out) / "final.pt")
    env.destroy()
    return 0


if __name__ == "__main__":
    code = main()
    collect_released_objects()
    sys.exit(code)
