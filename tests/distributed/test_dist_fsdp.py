"""FSDP2 over 2 gloo ranks takes the same AdamW steps as one process on the same global batch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor

from dmdr.config import ParallelConfig
from dmdr.distributed import DistEnv, all_finite, build_mesh, parallelize_denoiser
from tests.distributed.dist_toy import clean_name, full_params, run_workers, toy_batch, toy_model

STEPS = 2


def _train(model, env: DistEnv | None, steps: int = STEPS) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for step in range(steps):
        x, t, cond, target = toy_batch(step)
        if env is not None:  # this rank's half of the global batch
            n = x.shape[0] // env.world_size
            sl = slice(env.rank * n, (env.rank + 1) * n)
            x, t, cond, target = x[sl], t[sl], {k: v[sl] for k, v in cond.items()}, target[sl]
        loss = F.mse_loss(model(x, t, cond), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the trainer does (DTensor norm under FSDP2)
        assert all_finite(loss, params, env)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def _equivalence(env: DistEnv) -> None:
    mesh = build_mesh(ParallelConfig(), env.world_size)
    for lora in (False, True):
        for ac in ("none", "every_k", "full"):
            model = toy_model(lora)
            ref = copy.deepcopy(model)
            before = full_params(ref)
            _train(ref, None)
            parallel = ParallelConfig(param_dtype="fp32", reduce_dtype="fp32", activation_checkpointing=ac,
                                      ac_every=2)
            parallelize_denoiser(model, mesh, parallel, trainable=not lora)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            wrapped = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
            assert len(wrapped) == {"none": 0, "every_k": 2, "full": 3}[ac]
            opt = _train(model, env)
            got = full_params(model)
            want = {clean_name(n): p.detach() for n, p in ref.named_parameters()}
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5,
                                           msg=f"{name} ({lora=}, {ac=})")
            if lora:
                # The frozen base: no gradients, no optimizer state, weights untouched.
                state_ids = {id(p) for p in opt.state}
                for name, p in model.named_parameters():
                    if "lora_" not in name:
                        assert not p.requires_grad and p.grad is None and id(p) not in state_ids
                        key = clean_name(name)
                        torch.testing.assert_close(got[key], before[key], atol=0, rtol=0)
                assert len(opt.state) == len([p for p in model.parameters() if p.requires_grad])


def _mixed_precision_and_skip(env: DistEnv) -> None:
    mesh = build_mesh(ParallelConfig(), env.world_size)
    model = toy_model(lora=True)
    parallelize_denoiser(model, mesh, ParallelConfig(), trainable=False)  # bf16 params, fp32 reduce, full AC
    x, t, cond, target = toy_batch(0, n=4)
    out = model(x, t, cond)
    assert out.dtype == torch.bfloat16
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all_finite(loss, params, env)
    # A non-finite gradient on one rank makes every rank skip.
    if env.rank == 1:
        params[0].grad.to_local().view(-1)[0] = float("nan")
    assert not all_finite(loss, params, env)
    assert not all_finite(torch.tensor(float("inf")) if env.rank == 0 else loss, [], env)


def test_fsdp_step_equals_single_process_step():
    run_workers(_equivalence)


def test_bf16_mixed_precision_and_nonfinite_agreement():
    run_workers(_mixed_precision_and_skip)
