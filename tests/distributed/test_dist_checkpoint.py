"""DCP checkpoints: round trips at W=2 (sync and async), W=2 -> W=1 resharding, per-rank state,
fresh-optimizer seeding, corrupt/truncated detection, keep_last pruning."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dmdr.config import ParallelConfig
from dmdr.distributed import (
    CheckpointManager,
    DataLoaderState,
    DistEnv,
    ModelOptimizerState,
    RNGState,
    build_mesh,
    parallelize_denoiser,
    verify_checkpoint,
)
from dmdr.errors import CheckpointError
from tests.distributed.dist_toy import run_workers, toy_batch, toy_model


class Counters:
    def __init__(self) -> None:
        self.step = 0
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped = state["step"], state["skipped"]


class FakeLoader:
    def __init__(self, rank: int) -> None:
        self.rank, self.pos, self.resharded = rank, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["rank"] == self.rank
        self.pos = state["pos"]

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        self.resharded = states


class Run:
    """A generator (full fine-tune) and a teacher with a critic LoRA, their optimizers and the small state."""

    def __init__(self, env: DistEnv | None, gen_seed: int = 0):
        rank = env.rank if env else 0
        self.env = env
        self.generator = toy_model(lora=False, seed=gen_seed)
        self.teacher = toy_model(lora=True, seed=1)  # the "pretrained" base is the same in every run
        if env is not None:
            mesh = build_mesh(ParallelConfig(), env.world_size)
            parallel = ParallelConfig(param_dtype="fp32")
            parallelize_denoiser(self.generator, mesh, parallel, trainable=True)
            parallelize_denoiser(self.teacher, mesh, parallel, trainable=False)
        self.gen_opt = torch.optim.AdamW(self.generator.parameters(), lr=1e-2, weight_decay=0.01)
        critic_params = [p for p in self.teacher.parameters() if p.requires_grad]
        self.critic_opt = torch.optim.AdamW(critic_params, lr=1e-2)
        self.rng = torch.Generator().manual_seed(100 + rank)
        self.loader = FakeLoader(rank)
        self.counters = Counters()

    def app_state(self) -> dict[str, Any]:
        return {"generator": ModelOptimizerState(self.generator, self.gen_opt),
                "critic": ModelOptimizerState(self.teacher, self.critic_opt, trainable_only=True),
                "trainer": self.counters, "rng": RNGState({"noise": self.rng}, include_global=False),
                "data": DataLoaderState(self.loader)}

    def step(self) -> None:
        x, t, cond, target = toy_batch(self.counters.step)
        if self.env is not None:
            n = x.shape[0] // self.env.world_size
            sl = slice(self.env.rank * n, (self.env.rank + 1) * n)
            x, t, cond, target = x[sl], t[sl], {k: v[sl] for k, v in cond.items()}, target[sl]
        for model, opt in ((self.generator, self.gen_opt), (self.teacher, self.critic_opt)):
            F.mse_loss(model(x, t, cond), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.randn(3, generator=self.rng)
        self.loader.pos += 1
        self.counters.step += 1

    def full_state(self) -> dict[str, Any]:
        """Full (unsharded) models and optimizer states (collective under FSDP2)."""
        full = StateDictOptions(full_state_dict=True)
        frozen = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        state = {"generator": get_state_dict(self.generator, self.gen_opt, options=full),
                 "critic": get_state_dict(self.teacher, self.critic_opt, options=frozen),
                 "counters": self.counters.state_dict()}
        return copy.deepcopy(state)  # unsharded tensors (e.g. Adam's step) are the live objects


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------------ #
# W=2: sync and async round trips, then (in the test process) W=2 -> W=1
# ------------------------------------------------------------------------------------------------ #

def _round_trip_w2(env: DistEnv, out: str) -> None:
    run = Run(env)
    mgr = CheckpointManager(out, keep_last=3, async_save=True, env=env)
    run.step()
    run.step()
    ref2 = run.full_state()
    mgr.save(2, run.app_state())  # asynchronous: returns once staged
    run.step()  # changes parameters in place while step 2 is being written
    ref3 = run.full_state()
    rng3 = run.rng.get_state()
    mgr.save(3, run.app_state(), final=True)  # finalises step 2, then writes step 3 synchronously
    mgr.close()
    if env.is_main:
        torch.save({"ref2": ref2, "ref3": ref3}, Path(out) / "ref.pt")
    env.barrier()

    fresh = Run(env, gen_seed=5)
    mgr = CheckpointManager(out, keep_last=3, env=env)
    assert mgr.latest() == Path(out) / "checkpoints" / "step-3"
    assert mgr.resume(fresh.app_state()) == 3
    assert_same(fresh.full_state(), ref3)
    assert torch.equal(fresh.rng.get_state(), rng3)  # per-rank RNG, this rank's own
    assert (fresh.loader.rank, fresh.loader.pos) == (env.rank, 3)
    older = Run(env, gen_seed=6)
    assert mgr.load(older.app_state(), Path(out) / "checkpoints" / "step-2") == 2
    assert_same(older.full_state(), ref2)  # the async save captured step 2, not the later weights
    # The continued runs stay identical: one more step from the restored state.
    run.step()
    fresh.step()
    assert_same(fresh.full_state(), run.full_state())


def test_round_trip_w2_and_reshard_to_w1(tmp_path, caplog):
    run_workers(_round_trip_w2, str(tmp_path))
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-2", "step-3"]
    assert (ckpt / "latest").read_text().strip() == "step-3"
    marker = json.loads((ckpt / "step-3" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 3
    keys = dcp.FileSystemReader(str(ckpt / "step-3")).read_metadata().state_dict_metadata.keys()
    assert any("lora_A" in k for k in keys)
    assert not any(k.startswith("critic.model") and ".base." in k for k in keys)  # frozen base not saved
    assert {"rng.rank0", "rng.rank1", "data.rank0", "data.rank1"} <= set(keys)

    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    run = Run(None, gen_seed=7)
    with caplog.at_level(logging.WARNING, logger="dmdr"):
        assert CheckpointManager(tmp_path).resume(run.app_state()) == 3
    assert_same(run.full_state(), ref["ref3"])  # models + optimizers resharded from 2 ranks to 1
    # Per-rank state at another world size: the loader gets every old rank's state, the RNG starts fresh.
    assert run.loader.resharded == [{"rank": 0, "pos": 3}, {"rank": 1, "pos": 3}] and run.loader.pos == 0
    assert torch.equal(run.rng.get_state(), torch.Generator().manual_seed(100).get_state())
    assert "per-rank state rng starts fresh" in caplog.text


# ------------------------------------------------------------------------------------------------ #
# One process
# ------------------------------------------------------------------------------------------------ #

def _saved_runs(tmp_path: Path, steps: int, keep_last: int = 5,
                owns_folder: bool = False) -> tuple[CheckpointManager, Run]:
    run = Run(None)
    mgr = CheckpointManager(tmp_path, keep_last=keep_last, owns_folder=owns_folder)
    for k in range(1, steps + 1):
        run.step()
        mgr.save(k, run.app_state())
    return mgr, run


def test_fresh_optimizer_state_is_restored_exactly(tmp_path):
    mgr, run = _saved_runs(tmp_path, 2)
    fresh = Run(None, gen_seed=3)
    assert not fresh.gen_opt.state
    assert mgr.resume(fresh.app_state()) == 2
    for opt_a, opt_b in ((run.gen_opt, fresh.gen_opt), (run.critic_opt, fresh.critic_opt)):
        pa = [p for g in opt_a.param_groups for p in g["params"]]
        pb = [p for g in opt_b.param_groups for p in g["params"]]
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], atol=0, rtol=0)
    run.step()
    fresh.step()
    assert_same(fresh.full_state(), run.full_state())


def _largest_shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_truncated_or_corrupt_checkpoint_is_skipped_and_refused(tmp_path, caplog):
    mgr, _ = _saved_runs(tmp_path, 2)
    step1, step2 = tmp_path / "checkpoints" / "step-1", tmp_path / "checkpoints" / "step-2"
    assert mgr.latest() == step2
    shard = _largest_shard(step2)
    data = shard.read_bytes()

    shard.write_bytes(data[:-100])  # truncated
    with caplog.at_level(logging.WARNING, logger="dmdr"):
        assert mgr.latest() == step1
    assert str(shard) in caplog.text
    with pytest.raises(CheckpointError, match=rf"{shard} has {len(data) - 100} bytes, expected {len(data)}"):
        mgr.load(Run(None).app_state(), step2)
    assert mgr.resume(Run(None).app_state()) == 1

    flipped = bytearray(data)  # same size, one byte changed
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert mgr.latest() == step2  # the cheap check passes ...
    with pytest.raises(CheckpointError, match=rf"{shard} does not match its recorded CRC32"):
        mgr.load(Run(None).app_state(), step2)
    assert mgr.resume(Run(None).app_state()) == 1  # ... the full check falls back to step 1

    shard.write_bytes(data)
    meta = (step2 / ".metadata").read_bytes()
    (step2 / ".metadata").write_bytes(meta[:10] + bytes([meta[10] ^ 0xFF]) + meta[11:])
    assert mgr.latest() == step1  # the cheap check hashes the small .metadata file
    assert "does not match its recorded SHA-256" in verify_checkpoint(step2)
    (step2 / ".metadata").write_bytes(meta)
    assert mgr.latest() == step2
    (step2 / "COMPLETE.json").unlink()
    assert mgr.latest() == step1
    with pytest.raises(CheckpointError, match=r"step-2 is not a complete checkpoint: COMPLETE.json is miss"):
        mgr.load(Run(None).app_state(), step2)
    (step1 / ".metadata").unlink()
    assert verify_checkpoint(step1) == f"checkpoint file {step1 / '.metadata'} is missing"
    assert mgr.latest() is None
    # Every checkpoint unusable: one line, nothing touched (a fresh start only with resume=never).
    with pytest.raises(CheckpointError, match=r"^none of the 2 checkpoint\(s\) in .* is usable \(newest, step-2: "):
        mgr.resume(Run(None).app_state())
    with pytest.raises(CheckpointError, match=r"^none of the 2 checkpoint"):
        mgr.check_record()
    assert mgr.resume(Run(None).app_state(), "never") is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]


@pytest.mark.parametrize("owns_folder", [False, True])
def test_keep_last_tmp_dirs_and_pointer(tmp_path, owns_folder):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-step-9.otherhost-77").mkdir()  # another writer's save: in progress, or dead
    (root / "step-99").mkdir()  # a folder without a marker: never chosen
    mgr, _ = _saved_runs(tmp_path, 4, keep_last=2, owns_folder=owns_folder)
    names = sorted(p.name for p in root.iterdir())
    # Only the run folder's lock holder may delete another writer's temp (it knows that writer is dead).
    kept = [] if owns_folder else [".tmp-step-9.otherhost-77"]
    assert names == sorted([*kept, "latest", "step-3", "step-4", "step-99"])
    assert (root / "latest").read_text().strip() == "step-4"
    assert mgr.latest() == root / "step-4"


def test_resume_modes_and_mismatched_entries(tmp_path):
    mgr, _ = _saved_runs(tmp_path, 1)
    run = Run(None, gen_seed=3)
    assert mgr.resume(run.app_state(), "never") is None
    assert mgr.resume(run.app_state(), str(tmp_path / "checkpoints" / "step-1")) == 1
    app = run.app_state() | {"ema": Counters()}
    with pytest.raises(CheckpointError, match=r"no entry 'ema' \(it holds critic, data, generator, rng,"):
        mgr.load(app, tmp_path / "checkpoints" / "step-1")
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        mgr.load(app, tmp_path / "nowhere")
    # Re-saving an existing step replaces it atomically.
    mgr.save(1, run.app_state())
    assert mgr.latest() == tmp_path / "checkpoints" / "step-1"


def test_two_adapters_two_optimizers_in_one_network(tmp_path):
    """LoRA generator mode: generator and critic adapters share the teacher's network."""
    from dmdr.models.lora import inject_lora, lora_parameters

    def build(seed: int):
        model = toy_model(lora=True, seed=1)
        torch.manual_seed(seed)
        inject_lora(model.net, "generator", rank=2, alpha=2.0, targets=["to_q", "to_v"])
        for p in lora_parameters(model.net, "generator"):
            torch.nn.init.normal_(p, std=0.2)
        model.lora_scales.set(generator=1.0)
        gen = torch.optim.AdamW(lora_parameters(model.net, "generator"), lr=1e-2)
        critic = torch.optim.AdamW(lora_parameters(model.net, "critic"), lr=3e-2)
        return model, gen, critic

    model, gen, critic = build(0)
    for step in range(2):
        x, t, cond, target = toy_batch(step)
        F.mse_loss(model(x, t, cond), target).backward()
        gen.step()
        critic.step()
        gen.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)
    mgr = CheckpointManager(tmp_path, async_save=True)  # one process: async falls back to a thread too
    mgr.save(2, {"teacher": ModelOptimizerState(model, [gen, critic], trainable_only=True)})
    mgr.close()
    model2, gen2, critic2 = build(1)
    mgr.resume({"teacher": ModelOptimizerState(model2, [gen2, critic2], trainable_only=True)})
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for o1, o2 in ((gen, gen2), (critic, critic2)):
        assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
        for p1, p2 in zip(o1.param_groups[0]["params"], o2.param_groups[0]["params"]):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(o1.state[p1][key], o2.state[p2][key], atol=0, rtol=0)


def test_failed_save_and_dcp_load_errors_are_one_line_and_keep_earlier_checkpoints(tmp_path, monkeypatch):
    """DCP reports failures as CheckpointException, a BaseException: both directions still give one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    mgr, run = _saved_runs(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"), "traceback...")})

    with monkeypatch.context() as mp:
        mp.setattr(dcp, "save", disk_full)
        with pytest.raises(CheckpointError) as err:
            mgr.save(2, run.app_state())
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and ".tmp-step-2" in msg
    assert mgr.latest() == tmp_path / "checkpoints" / "step-1"  # the earlier checkpoint stays latest

    with monkeypatch.context() as mp:
        mp.setattr(dcp, "load", disk_full)
        with pytest.raises(CheckpointError, match=r"^cannot load checkpoint .*step-1: \[Errno 28\] No space"):
            mgr.load(Run(None).app_state(), tmp_path / "checkpoints" / "step-1")
