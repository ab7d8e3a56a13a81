"""Loading a checkpoint runs no code from it; the manifest is checked before DCP reads a byte; the run record
(family, generator mode, teacher fingerprint) refuses another setup's checkpoint before any weights load."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dmdr.distributed.safe_load as safe_load
from dmdr.distributed import CheckpointManager, ModelOptimizerState, RNGState
from dmdr.distributed.checkpoint import MARKER, read_marker, saved_keys
from dmdr.distributed.offline import check_plain_items, read_checkpoint
from dmdr.distributed.safe_load import UnsafeCheckpointError
from dmdr.distributed.state import RankLocal
from dmdr.errors import CheckpointError
from dmdr.provenance import RECORD_KEY, record_mismatch, teacher_fingerprint

RECORD = {"family": "sd3", "generator_mode": "lora", "teacher": "0123456789abcdef", "teacher_path": "/m/sd3"}


class SideEffect:
    """Unpickling this creates ``path`` (what a crafted checkpoint would do with ``os.system``)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Counters:
    def __init__(self, extra: Any = None):
        self.step, self.extra = 0, extra

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "history": [1.5, 2.5], "name": "x"}
        if self.extra is not None:
            state["extra"] = self.extra
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


class Blob(RankLocal):
    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> Any:
        return {"value": self.value}

    def load_state_dict(self, state: Any) -> None:
        self.value = state["value"]


def _app(seed: int = 0, counters: Any = None, blob: Any = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return {"model": ModelOptimizerState(model, torch.optim.AdamW(model.parameters())),
            "trainer": counters or Counters(), "rng": RNGState({"noise": torch.Generator().manual_seed(seed)}),
            "blob": blob or Blob(7)}


def _weights(app: dict[str, Any]) -> torch.Tensor:
    return app["model"].model.weight.detach().clone()


def _rewrite_manifest(step_dir: Path, drop_record: bool = False) -> None:
    """Make COMPLETE.json match the files again (what someone who forged a file would do)."""
    marker = read_marker(step_dir)
    for rel in marker["files"]:
        data = (step_dir / rel).read_bytes()
        marker["files"][rel] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    marker["metadata_sha256"] = hashlib.sha256((step_dir / ".metadata").read_bytes()).hexdigest()
    if drop_record:
        marker.pop(RECORD_KEY, None)
    (step_dir / MARKER).write_text(json.dumps(marker))


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


# ------------------------------------------------------------------------------------------------ #
# plain data only
# ------------------------------------------------------------------------------------------------ #

def test_every_kind_of_state_round_trips_as_plain_data(tmp_path):
    """RNG states (torch, Python, named generators), counters, per-rank blobs all load with weights_only."""
    app = _app(counters=Counters())
    app["trainer"].step = 5
    torch.randn(4, generator=app["rng"].generators["noise"])
    random.random()
    expect_py, expect_gen = random.getstate(), app["rng"].generators["noise"].get_state()
    mgr = CheckpointManager(tmp_path, record=RECORD)
    step_dir = mgr.save(1, app)
    for _ in range(3):
        random.random()
    fresh = _app(seed=1, blob=Blob(0))
    assert CheckpointManager(tmp_path, record=RECORD).resume(fresh) == 1
    assert random.getstate() == expect_py
    assert torch.equal(fresh["rng"].generators["noise"].get_state(), expect_gen)
    assert fresh["trainer"].step == 5 and fresh["blob"].value == 7
    assert torch.equal(_weights(fresh), _weights(app))
    check_plain_items(step_dir)  # the export-side scan accepts what dmdr writes
    assert read_checkpoint(step_dir)["trainer"]["history"] == [1.5, 2.5]


@pytest.mark.parametrize("where", ["rank_blob", "dcp_item"])
def test_pickle_with_side_effect_is_refused_and_never_runs(tmp_path, where):
    """A consistent checkpoint (manifest and all) whose state carries a code-running pickle."""
    pwned = tmp_path / "pwned"
    evil = SideEffect(pwned)
    app = _app(blob=Blob(evil)) if where == "rank_blob" else _app(counters=Counters(extra={"a": [evil]}))
    step_dir = CheckpointManager(tmp_path, record=RECORD).save(1, app)
    assert not pwned.exists()
    entry = "blob.rank0" if where == "rank_blob" else "trainer.extra.a"
    fresh = _app(seed=1, counters=Counters(extra={"a": [0]} if where == "dcp_item" else None))  # the forged item
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(tmp_path, record=RECORD).resume(fresh)
    _one_line(err, f"entry '{entry}' is not plain data (it names ", "open", "refusing to unpickle")
    with pytest.raises(UnsafeCheckpointError) as err:
        check_plain_items(step_dir)
    _one_line(err, "is not plain data")
    if where == "dcp_item":  # the offline reader returns per-rank blobs undecoded
        with pytest.raises(UnsafeCheckpointError):
            read_checkpoint(step_dir)
    assert not pwned.exists()


def _evil_metadata(step_dir: Path, pwned: Path) -> None:
    """Replace ``.metadata`` with DCP's own metadata plus a code-running object, pickled the way DCP does."""
    metadata = safe_load.SafeFileSystemReader(str(step_dir)).read_metadata()
    metadata.storage_meta.modules = [SideEffect(pwned)]
    with open(step_dir / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)


def test_forged_metadata_with_consistent_manifest_is_refused(tmp_path):
    pwned = tmp_path / "pwned"
    step_dir = CheckpointManager(tmp_path, record=RECORD).save(1, _app())
    _evil_metadata(step_dir, pwned)
    _rewrite_manifest(step_dir)  # the forger also rewrote the checksums: only the restricted unpickler stands
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(tmp_path, record=RECORD).load(_app(seed=1), step_dir)
    _one_line(err, f"{step_dir / '.metadata'} is not plain data (it names io.open)")
    for reader in (saved_keys, check_plain_items, read_checkpoint):
        with pytest.raises(UnsafeCheckpointError):
            reader(step_dir)
    assert not pwned.exists()


def test_manifest_is_verified_before_dcp_reads_anything(tmp_path, monkeypatch):
    """A changed .metadata (manifest not rewritten) fails the SHA-256 check; DCP's reader is never called."""
    pwned = tmp_path / "pwned"
    mgr = CheckpointManager(tmp_path, record=RECORD)
    step_dir = mgr.save(1, _app())
    _evil_metadata(step_dir, pwned)
    marker = read_marker(step_dir)  # sizes fixed up, so that the hash is what catches it
    marker["files"][".metadata"]["size"] = (step_dir / ".metadata").stat().st_size
    (step_dir / MARKER).write_text(json.dumps(marker))
    calls = []

    def spy(self, *args, **kwargs):
        calls.append(self)
        raise AssertionError("DCP read .metadata before the manifest check")

    monkeypatch.setattr(safe_load.SafeFileSystemReader, "read_metadata", spy)
    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemReader, "read_metadata", spy)
    with pytest.raises(CheckpointError) as err:
        mgr.load(_app(seed=1), step_dir)
    _one_line(err, "does not match its recorded SHA-256")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):  # auto: nothing usable is refused
        mgr.resume(_app(seed=1))
    from dmdr.export import resolve_checkpoint

    with pytest.raises(CheckpointError, match="SHA-256"):
        resolve_checkpoint(tmp_path, 1)
    assert calls == [] and not pwned.exists()


# ------------------------------------------------------------------------------------------------ #
# the run record
# ------------------------------------------------------------------------------------------------ #

@pytest.mark.parametrize("change, needle", [
    ({"family": "zimage"}, "trained with model.family=sd3, the current config has model.family=zimage"),
    ({"generator_mode": "full"}, "trained with model.generator_mode=lora, the current config has "
                                 "model.generator_mode=full"),
    ({"teacher": "fedcba9876543210", "teacher_path": "/m/other"},
     "trained from another teacher: /m/sd3 (fingerprint 0123456789abcdef) then, model.path /m/other (fingerprint "
     "fedcba9876543210) now"),
])
def test_checkpoint_of_another_setup_is_refused_before_any_read(tmp_path, monkeypatch, change, needle):
    step_dir = CheckpointManager(tmp_path, record=RECORD).save(1, _app())
    other = CheckpointManager(tmp_path, record={**RECORD, **change})
    monkeypatch.setattr(safe_load.SafeFileSystemReader, "read_metadata",
                        lambda *a, **k: pytest.fail("read the checkpoint before refusing it"))
    with pytest.raises(CheckpointError) as err:
        other.check_record("auto")
    _one_line(err, f"checkpoint {step_dir} was {needle}", "another --train.output_dir")
    for call in (lambda: other.resume(_app(seed=1)), lambda: other.load(_app(seed=1), step_dir)):
        with pytest.raises(CheckpointError) as err:
            call()
        _one_line(err, needle)
    monkeypatch.undo()
    assert CheckpointManager(tmp_path, record=dict(RECORD)).resume(_app(seed=1)) == 1


def test_checkpoint_without_record_loads_with_a_warning(tmp_path, caplog):
    step_dir = CheckpointManager(tmp_path).save(1, _app())  # as an older dmdr wrote it: no record
    assert RECORD_KEY not in read_marker(step_dir)
    mgr = CheckpointManager(tmp_path, record=RECORD)
    mgr.check_record("auto")
    with caplog.at_level(logging.WARNING, logger="dmdr"):
        assert mgr.resume(_app(seed=1)) == 1
    assert "records no model family, generator mode or teacher fingerprint" in caplog.text
    assert record_mismatch(None, RECORD, step_dir) is None


def _header(file: Path) -> bytes:
    data = file.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def _teacher(folder: Path, seed: int, shards: int = 1) -> Path:
    """A denoiser folder as ``save_pretrained`` writes it: config.json and safetensors (sharded with an index)."""
    from safetensors.torch import save_file

    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"num_layers": 2, "hidden": 64}))
    gen = torch.Generator().manual_seed(seed)
    names = [f"blocks.{i}.weight" for i in range(4)]
    tensors = {n: torch.randn(64, 300, generator=gen) for n in names}  # 75 KiB each: windows hit distinct bytes
    if shards == 1:
        save_file(tensors, folder / "transformer" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for k in range(shards):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t for i, (n, t) in enumerate(tensors.items()) if i % shards == k}
        save_file(part, folder / "transformer" / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_teacher_fingerprint_tells_teachers_apart_not_folders(tmp_path):
    a, b = _teacher(tmp_path / "a", seed=0), _teacher(tmp_path / "b", seed=1)  # same headers, other values
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert _header(a / weights) == _header(b / weights)
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    moved = shutil.copytree(a, tmp_path / "moved")
    assert teacher_fingerprint(moved) == teacher_fingerprint(a)
    (moved / "transformer" / "config.json").write_text(json.dumps({"num_layers": 3, "hidden": 64}))
    assert teacher_fingerprint(moved) != teacher_fingerprint(a)
    sharded = _teacher(tmp_path / "sharded", seed=0, shards=2)
    assert teacher_fingerprint(sharded) == teacher_fingerprint(_teacher(tmp_path / "sharded-again", seed=0, shards=2))
    assert teacher_fingerprint(sharded) not in (teacher_fingerprint(a), teacher_fingerprint(b))
