"""The process group's timeouts and collectives (dreamprm/dist.py)."""

import json
import os
import subprocess
import sys

import torch
from multirank import ROOT

from dreamprm import dist


def test_without_a_process_group_the_collectives_return_their_input():
    assert not torch.distributed.is_initialized()
    assert dist.rank_world() == (0, 1)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_into_tensor(t) is t
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("x") == "x"
    dist.barrier()
    assert dist.silent_ranks(1) is None  # no monitor group: unknown


def test_collective_failures_are_told_from_other_errors():
    assert dist.collective_failed(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert dist.collective_failed(RuntimeError("Timed out waiting 7000ms for recv operation to complete"))
    assert not dist.collective_failed(RuntimeError("CUDA out of memory"))
    assert not dist.collective_failed(ValueError("Timed out waiting"))


def test_every_process_group_waits_collective_timeout_not_torchs_30_minutes():
    """DeepSpeed creates its own groups without a timeout (its world clone carries the gradient
    all-reduce and ZeRO's gathers); torch gives such groups 30 min, so a silent rank caught there
    would outlast --collective_timeout. Every group of the process must carry ours."""
    code = (
        "import json, torch, torch.distributed.distributed_c10d as c10d\n"
        "from dreamprm import engine\n"
        "from dreamprm.config import Config\n"
        "from dreamprm.hypergrad import StepLoss\n"
        "rank, world = engine.init_distributed(7)\n"
        "cfg = Config(); cfg.train.deepspeed = 'ds_configs/zero3.json'; cfg.train.precision = 'fp32'\n"
        "engine.create_engine(cfg, rank, world, StepLoss())\n"
        "print(json.dumps([pg._get_backend(torch.device('cpu')).options._timeout.total_seconds()\n"
        "                  for pg in c10d._world.pg_map]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    timeouts = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(timeouts) >= 2 and set(timeouts) == {7.0}, timeouts  # the world group and DeepSpeed's clone


def test_the_timeout_is_set_by_the_call_not_at_import():
    code = ("import torch.distributed.distributed_c10d as c10d\n"
            "before = c10d.default_pg_timeout\n"
            "from dreamprm import dist, engine\n"
            "assert c10d.default_pg_timeout == before, 'set at import'\n"
            "dist.set_collective_timeout(7)\n"
            "print(c10d.default_pg_timeout.total_seconds())\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "7.0"
