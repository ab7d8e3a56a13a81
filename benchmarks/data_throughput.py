"""Prompt-loader throughput and memory over generated JSONL / Parquet sources of growing size.

For each format and size, a fresh process reads one full epoch through ``build_prompt_loader``
(the training path: shuffle blocks, cleaning, batching, worker processes) and reports prompts/s
per worker and its peak RSS (the training process and the workers). Streaming means the RSS
must not grow with the number of prompts: compare the rows of one format.

    python benchmarks/data_throughput.py            # 1M and 10M prompts (minutes, ~1.5 GB of temp files)
    python benchmarks/data_throughput.py --quick    # 100k and 1M (seconds)

The generated files live in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

WORDS = ("a photo of a cat dog astronaut horse red blue green car city night rain forest mountain river "
         "portrait painting oil watercolor cinematic lighting golden hour close-up wide angle detailed "
         "studio soft shadows neon futuristic ancient temple beach sunset snow").split()


def _prompts(start: int, n: int) -> list[str]:
    rng = random.Random(start)
    return [f"{i}: " + " ".join(rng.choices(WORDS, k=6 + i % 20)) for i in range(start, start + n)]


def generate(fmt: str, n: int, folder: str) -> str:
    """Write ``n`` prompts (in chunks, never all in memory) and return the path."""
    chunk = 200_000
    if fmt == "jsonl":
        path = os.path.join(folder, f"prompts-{n}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for start in range(0, n, chunk):
                f.writelines(json.dumps({"prompt": p, "id": 0}) + "\n" for p in _prompts(start, min(chunk, n - start)))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(folder, f"prompts-{n}.parquet")
    schema = pa.schema([("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            writer.write_table(pa.table({"prompt": _prompts(start, min(chunk, n - start))}, schema=schema),
                               row_group_size=100_000)
    return path


def child(path: str, workers: int, batch_size: int, shuffle_buffer: int) -> dict:
    """Read one epoch of ``path`` in this process; return the measurements."""
    from dmdr.config import DataConfig
    from dmdr.data import build_prompt_loader

    kb = 1024 if sys.platform == "darwin" else 1
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / kb
    cfg = DataConfig(sources=(path,), batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer)
    loader = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0, epochs=1)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["prompts"])
    seconds = time.perf_counter() - start
    del loader
    return {"prompts": n, "seconds": seconds, "baseline_mb": baseline,
            "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / kb,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / kb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="prompts per generated source")
    parser.add_argument("--quick", action="store_true", help="100k and 1M prompts")
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (rate is reported per worker)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--tmp", default=None, help="where to write the generated sources (deleted after)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.workers, args.batch_size, args.shuffle_buffer)))
        return 0
    sizes = [100_000, 1_000_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    folder = tempfile.mkdtemp(prefix="dmdr-data-bench-", dir=args.tmp)
    rows = []
    try:
        for fmt in args.formats.split(","):
            for n in sizes:
                t = time.perf_counter()
                path = generate(fmt, n, folder)
                gen = time.perf_counter() - t
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", path, "--workers", str(args.workers),
                     "--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer)],
                    check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["prompts"] == n, (r["prompts"], n)
                r.update(fmt=fmt, n=n, mb=os.path.getsize(path) / 2**20, gen=gen)
                rows.append(r)
                os.remove(path)
                print(f"  {fmt} {n:>11,}: {r['prompts'] / r['seconds']:,.0f} prompts/s", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    w = max(1, args.workers)
    print(f"\nworkers={args.workers} batch_size={args.batch_size} shuffle_buffer={args.shuffle_buffer}")
    print("peak RSS (kernel high-water marks) in MB: main = the training process (baseline: after imports, "
          "before the loader), worker = the largest loader worker (forked: includes the pages it shares)")
    print(f"{'format':8} {'prompts':>11} {'file MB':>8} {'prompts/s/worker':>17} {'baseline':>9} "
          f"{'main peak':>10} {'worker peak':>12}")
    for r in rows:
        print(f"{r['fmt']:8} {r['n']:>11,} {r['mb']:>8.0f} {r['prompts'] / r['seconds'] / w:>17,.0f} "
              f"{r['baseline_mb']:>9.0f} {r['main_peak_mb']:>10.0f} {r['worker_peak_mb']:>12.0f}")
    for fmt in args.formats.split(","):
        pair = [r for r in rows if r["fmt"] == fmt]
        if len(pair) >= 2:
            a, b = pair[0], pair[-1]
            print(f"{fmt}: {b['n'] / a['n']:.0f}x the prompts -> main peak RSS {a['main_peak_mb']:.0f} -> "
                  f"{b['main_peak_mb']:.0f} MB, worker peak RSS {a['worker_peak_mb']:.0f} -> "
                  f"{b['worker_peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
