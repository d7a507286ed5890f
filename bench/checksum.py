"""What the checkpoint checksums cost per GB (issue 11): SHA-256 of a checkpoint-sized file
next to writing it.

    python bench/checksum.py                  # 1 GiB, in the system temp folder
    python bench/checksum.py --mb 256 --dir /scratch/me --cold

One file of --mb MiB of random fp32 values is written with torch.save (fsync'd, as a checkpoint
shard is), then hashed with checkpoint.file_digest (what save and verify run) twice: right
after the write (page cache warm: the CPU cost of SHA-256) and, with --cold where the page
cache can be dropped (root on Linux), cold (what a resume on a fresh node pays: the read from
disk dominates). Ranks hash their share of a checkpoint's files in parallel (engine.save_checkpoint,
engine.verify_on_every_rank), so the per-rank cost is this per GB of that rank's share.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dreamprm.checkpoint import file_digest


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="file size in MiB (default %(default)s)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="folder for the file (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed hashes of the warm file (the best is shown)")
    ap.add_argument("--cold", action="store_true", help="also hash after dropping the page cache (root on Linux; "
                    "it drops the whole machine's cache)")
    args = ap.parse_args(argv)
    gb = args.mb / 1024
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "shard.pt"
        t = torch.randn(args.mb * 2**20 // 4)
        t0 = time.perf_counter()
        torch.save({"flat": t}, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
        warm = min(_timed(file_digest, path) for _ in range(max(1, args.repeats)))
        cold = _timed(file_digest, path) if args.cold and drop_page_cache() else None
    rows = [("torch.save + fsync", write_s), ("sha256, page cache warm", warm)]
    if cold is not None:
        rows.append(("sha256, cold (cache dropped)", cold))
    print(f"{args.mb} MiB in {args.dir}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"{'what':32s} {'s':>7s} {'s per GB':>9s} {'GB/s':>6s} {'x write':>8s}")
    for name, s in rows:
        print(f"{name:32s} {s:7.2f} {s / gb:9.2f} {gb / s:6.2f} {s / write_s:8.2f}")
    if args.cold and cold is None:
        print("(cold read not measured: dropping the page cache needs root on Linux)")
    return 0


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
