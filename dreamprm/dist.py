"""The process group in plain torch.distributed: timeouts and the collectives the run uses.

No DeepSpeed here (engine.init_distributed creates the group through it). Every collective is
safe to call without a group or with a group of one, where it returns its input unchanged.
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch
import torch.distributed as _dist
import torch.distributed.distributed_c10d as _c10d
from torch.distributed import ReduceOp

_monitor = None  # a gloo group for monitored_barrier (gloo only), which names the silent ranks


def set_collective_timeout(seconds: float) -> None:
    """How long every collective waits for the other ranks, for the groups created from now on.

    Groups created without a timeout take torch's module default (30 min), not the world group's:
    DeepSpeed's own data-parallel group (a clone of the world, used for the gradient all-reduce and
    ZeRO's gathers) is one, so a rank going silent there would hang for 30 min. Every group gets ours."""
    _c10d.default_pg_timeout = timedelta(seconds=seconds)
    if hasattr(_c10d, "default_pg_nccl_timeout"):
        _c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def make_monitor_group(seconds: float) -> None:
    """The gloo side group silent_ranks uses (monitored_barrier exists for gloo only); once, for more than one rank."""
    global _monitor
    if _dist.is_initialized() and _dist.get_world_size() > 1 and _monitor is None:
        _monitor = _dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))


def forget_groups() -> None:
    """After the groups were destroyed: the monitor group is gone with them."""
    global _monitor
    _monitor = None


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not _dist.is_initialized():
        return 0, 1
    return _dist.get_rank(), _dist.get_world_size()


def _grouped() -> bool:
    return _dist.is_initialized() and _dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op=ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a (small, often CPU) tensor; NCCL only reduces GPU tensors."""
    if _grouped():
        if _dist.get_backend() == "nccl" and not t.is_cuda:
            on_gpu = t.to("cuda")
            _dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu.cpu())
        else:
            _dist.all_reduce(t, op=op)
    return t


def all_gather_into_tensor(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (same size on all ranks), concatenated in rank order."""
    if not _grouped():
        return x
    full = x.new_empty(x.numel() * _dist.get_world_size())
    _dist.all_gather_into_tensor(full, x)
    return full


def barrier() -> None:
    if _dist.is_initialized():
        _dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _grouped():
        return [obj]
    out = [None] * _dist.get_world_size()
    _dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not _grouped():
        return obj
    box = [obj]
    _dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_failed(e: BaseException) -> bool:
    """Whether e is a collective that timed out or lost its peer (gloo and NCCL wording)."""
    if isinstance(e, getattr(_dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                            "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


def silent_ranks(wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that do not reach a barrier within wait_s. Known on
    rank 0 (monitored_barrier); None on other ranks, without a group of more than one, or when
    the barrier fails in another way."""
    if _monitor is None:
        return None
    try:
        _dist.monitored_barrier(group=_monitor, timeout=timedelta(seconds=wait_s), wait_all_ranks=True)
        return []
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        return [int(x) for x in m.group(1).split(",")] if m and _dist.get_rank() == 0 else None

