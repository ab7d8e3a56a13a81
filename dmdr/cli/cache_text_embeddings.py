"""Encode every prompt of the data sources once and write a text-embedding cache.

A training run with ``--data.embedding_cache DIR`` then serves the cached conditioning from its
data loader and need not load the (frozen, large) text encoders at all. Usage::

    python tools/cache_text_embeddings.py --model.path /models/sd3.5-large \\
        --data.sources 'prompts/*.jsonl' --data.embedding_cache cache/sd35 [--batch-size 64]

    # several GPUs: each process encodes the prompts whose hash is its rank modulo the world size
    torchrun --nproc_per_node=8 tools/cache_text_embeddings.py --model.path ... --data.sources ... \\
        --data.embedding_cache cache/sd35

``--model.*`` and ``--data.*`` are the training config's keys (use the same ``data.*`` cleaning
settings as the run, so prompts are cut alike); the cache layout is described in
:mod:`dmdr.data.cache`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dmdr.config import TrainConfig, apply_overrides
from dmdr.data.cache import cache_embeddings
from dmdr.devices import DTYPES
from dmdr.errors import UserError, error_exit
from dmdr.preflight import PreflightError, job_shape, raise_problems, reports
from dmdr.preflight.tools import cache_tool_problems


def _parse(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other --section.field is a training config override.")
    parser.add_argument("--out", default="", help="cache folder (default: --data.embedding_cache)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per encode() call")
    parser.add_argument("--shard-prompts", type=int, default=1000, help="prompts per safetensors shard")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache already in the folder")
    args, rest = parser.parse_known_args(argv)
    cfg = apply_overrides(TrainConfig(), rest)
    args.out = args.out or cfg.data.embedding_cache
    if not args.out:
        raise UserError("say where to write the cache: --data.embedding_cache DIR (or --out DIR)")
    if args.batch_size < 1 or args.shard_prompts < 1:
        raise UserError("--batch-size and --shard-prompts must be >= 1")
    return args, cfg


def _load_encoder(cfg: TrainConfig, device: torch.device) -> Any:
    from dmdr.models.loading import load_text_encoders  # lazily: imports diffusers / transformers

    if not cfg.model.path:
        raise UserError("set --model.path (the diffusers folder whose text encoders to use)")
    # Only the text encoders and tokenizers: the denoiser and VAE weights are never read.
    return load_text_encoders(cfg.model.path, family=cfg.model.family, dtype=DTYPES[cfg.model.dtype],
                              device=device, max_sequence_length=cfg.model.max_sequence_length)


def _prepare_folder(out: Path, rank: int, world: int, overwrite: bool) -> None:
    """Refuse to mix with an existing cache, or (``--overwrite``) remove this rank's old files."""
    if not out.is_dir() or not any(out.glob("index-*.safetensors")):
        return
    if not overwrite:
        raise UserError(f"{out} already holds an embedding cache; pass --overwrite to replace it")
    mine = [f"index-r{rank:05d}.safetensors", f"shard-r{rank:05d}-*.safetensors"]
    if rank == 0:  # files of writer ranks that this (smaller) run does not have
        mine += [f.name for f in out.glob("*-r*.safetensors") if int(f.name.split("-r")[1][:5]) >= world]
        mine += ["negative.safetensors", "cache.json"]
    for pattern in mine:
        for f in out.glob(pattern):
            f.unlink()


def main(argv: list[str] | None = None, encoder: Any = None) -> int:
    """Run the tool; ``encoder`` replaces the model's text encoder (tests). Returns the exit status."""
    try:
        args, cfg = _parse(sys.argv[1:] if argv is None else argv)
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if args.device == "auto":
            device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        # Every bad path (model folder, sources, cache folder) in one message, before the encoders load.
        raise_problems(cache_tool_problems(cfg, args.out, check_model=encoder is None))
        _prepare_folder(Path(args.out), rank, world, args.overwrite)
        if encoder is None:
            encoder = _load_encoder(cfg, device)
        start, done = time.perf_counter(), [0, 0]

        def progress(n: int) -> None:
            done[0] += n
            if done[0] - done[1] >= 10_000:
                done[1] = done[0]
                rate = done[0] / (time.perf_counter() - start)
                print(f"[rank {rank}] {done[0]} prompts encoded ({rate:.0f}/s)", flush=True)

        meta = {"model": cfg.model.path, "family": cfg.model.family, "dtype": cfg.model.dtype,
                "max_sequence_length": cfg.model.max_sequence_length, "world": world}
        stats = cache_embeddings(cfg.data, encoder, args.out, batch_size=args.batch_size,
                                 shard_prompts=args.shard_prompts, rank=rank, world=world, meta=meta,
                                 progress=progress)
    except UserError as e:
        # the same message from every rank: once
        return error_exit(e, show=not isinstance(e, PreflightError) or reports(*job_shape()[:2]))
    print(f"[rank {rank}] wrote {stats['prompts']} prompts to {args.out} ({stats['duplicates']} duplicates "
          f"skipped) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
