"""Helpers for the tests that run several ranks: torchrun subprocesses and 2-process gloo groups."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
# launch/train.py on the demo, small and deterministic (no dropout, fp32)
TRAIN = ["launch/train.py", "--mode", "lora", "--lora_dropout", "0", "--precision", "fp32",
         "--batch_size", "2", "--meta_batch_size", "2", "--log_every", "1", "--disable_wandb"]


def run(cmd, timeout=600, check=True):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-6000:]}")
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> torch.Tensor:
    return torch.tensor([json.loads(ln)["weight"] for ln in (run_dir / "instance_weights.jsonl").open()])


def spawn_two_gloo_ranks(worker, out: Path) -> None:
    """worker(rank, port, out) in 2 processes that join a gloo group on a free local port."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2)
