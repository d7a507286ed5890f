"""Everything that touches DeepSpeed: process group, engine, the bilevel step, checkpoints.

This is the only module that imports deepspeed. The PRM loss and the hypergradient math
come from hypergrad.py (plain torch); this module runs them inside the engine:

inner_update: grad_accum micro-batches of the weighted loss, then the engine's own step.
meta_update:  right after an update (so the engine holds no accumulated gradients),
  1. v = grad of the meta loss on a meta batch, via torch.autograd.grad (full-shape local
     gradients on every ZeRO stage) averaged over ranks with one all-reduce;
  2. a_i for the instances of the last update (exact: persample hooks, one forward and backward
     per micro-batch; or finite differences);
  3. the weight module's gradient from hypergrad.weight_objective, summed over ranks,
     then its own optimizer step.
  Afterwards ds.optimizer.zero_grad() clears what autograd.grad left in ZeRO's buffers and
  the perturbed parameters are copied back from a saved clone, so the PRM, its optimizer
  state and the rest of the trajectory are bit-identical to a run without the meta pass
  (see ../shared/notes/zero3-meta-pass.md and tests/test_engine.py).
--hypergrad fused moves step 1 before the update (fused_meta_gradient) and step 2 into it
(inner_update(..., v=...): the same hooks inside the update's own backward).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's own pick here, without its "no GPU detected" warning
import deepspeed
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dreamprm import checkpoint as ckpt
from dreamprm import hypergrad, persample
from dreamprm.config import Config, RunConfig
from dreamprm.data.packing import select
from dreamprm.errors import CheckpointError, CollectiveError, ConfigError, ModelError, NonFiniteError
from dreamprm.model import build_prm

# DeepSpeed's ZeRO collectives call the torch.distributed names that torch 2.13 deprecated in
# favour of *_single; they still work, and the warning repeats on every rank and update.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                        "is deprecated", category=FutureWarning)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_monitor = None  # a gloo group for monitored_barrier (gloo only), which names the silent ranks


def init_distributed(timeout_s: float = RunConfig.collective_timeout) -> tuple[int, int]:
    """Join (or, for a plain `python` run, create) the process group; returns rank, world.

    timeout_s: how long a collective waits for the other ranks (torch's default, 30 min, is
    long for a lost node); the default is --collective_timeout's."""
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    # The shm op is never used for training and costs a 20-50 s compile on a cold cache.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Groups created without a timeout take torch's module default (30 min), not the world group's:
    # DeepSpeed's own data-parallel group (a clone of the world, used for the gradient all-reduce and
    # ZeRO's gathers) is one, so a rank going silent there would hang for 30 min. Every group gets ours.
    c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    global _monitor
    if dist.get_world_size() > 1 and _monitor is None:
        _monitor = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a (small, often CPU) tensor; NCCL only reduces GPU tensors."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            on_gpu = t.to("cuda")
            dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=op)
    return t


def collective_failed(e: BaseException) -> bool:
    """Whether e is a collective that timed out or lost its peer (gloo and NCCL wording)."""
    if isinstance(e, getattr(dist, "DistError", ())):
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
        dist.monitored_barrier(group=_monitor, timeout=timedelta(seconds=wait_s), wait_all_ranks=True)
        return []
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        return [int(x) for x in m.group(1).split(",")] if m and dist.get_rank() == 0 else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------- engine


def ds_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON (engine settings) completed with the batch fields of the run config."""
    ds = json.loads(Path(cfg.train.deepspeed).read_text()) if cfg.train.deepspeed else {}
    t = cfg.train
    ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=t.batch_size * t.grad_accum * world, gradient_clipping=t.grad_clip)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_optimization", {"stage": 0})
    ds["zero_allow_untested_optimizer"] = True  # a client torch AdamW: no FusedAdam JIT compile
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


@dataclass
class Engine:
    ds: object  # deepspeed.DeepSpeedEngine
    stage: int
    rank: int
    world: int
    tokenizer: object
    params: list = field(default_factory=list)  # trainable parameters, in a fixed order
    hf_ds_config: object = None  # keeps zero.Init partitioning active for ZeRO-3 loads
    # the inner loss; the inner update and both alignment methods use it, so the hypergradient is its own
    step_loss: hypergrad.StepLoss = field(default_factory=hypergrad.StepLoss)


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        frac = (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1 + math.cos(math.pi * frac))  # cosine
    return f


def create_engine(cfg: Config, rank: int, world: int, step_loss: hypergrad.StepLoss, tokenizer=None,
                  model: tuple | None = None, load_universal: bool = False) -> Engine:
    """The DeepSpeed engine around the PRM. model: (prm, tokenizer) built elsewhere (bench/gpu.py's random
    7B, via model.prepare_for_training); default: build_prm(cfg.model). load_universal: the run resumes
    from a DeepSpeed universal checkpoint (one of another world size, see universal_copy)."""
    dsc = ds_config(cfg, world)
    if load_universal:
        dsc["checkpoint"] = {**dsc.get("checkpoint", {}), "load_universal": True}
    stage = dsc["zero_optimization"].get("stage", 0)
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(dsc)  # must stay alive while the model is built
    torch.manual_seed(cfg.train.seed)  # head and LoRA init come from the global RNG
    prm, tokenizer = model if model is not None else build_prm(cfg.model, cfg.train.precision, tokenizer)
    params = [p for p in prm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds, _, _, _ = deepspeed.initialize(model=prm, optimizer=opt, lr_scheduler=sched, config=dsc,
                                       model_parameters=params)
    eng = Engine(ds=ds, stage=stage, rank=rank, world=world, tokenizer=tokenizer,
                 params=[p for p in ds.module.parameters() if p.requires_grad], hf_ds_config=hf_ds,
                 step_loss=step_loss)
    if cfg.meta.hypergrad == "finite_diff" and not cfg.meta.baseline:
        check_finite_diff_dtype(eng, cfg)
    return eng


def check_finite_diff_dtype(eng: Engine, cfg: Config) -> None:
    """finite_diff perturbs the parameters the forward reads; DeepSpeed decides their dtype
    (ZeRO 0-2 in bf16 cast LoRA adapters to bf16 too). In bf16 most of a perturbation of
    fd_radius / ||v|| per element rounds away, so refuse it rather than return noise."""
    dtypes = {str((p.ds_tensor if eng.stage == 3 else p).dtype).replace("torch.", "") for p in eng.params}
    low = sorted(dtypes - {"float32", "float64"})
    if low:
        raise ConfigError([f"--hypergrad finite_diff: after DeepSpeed set up the engine (ZeRO stage {eng.stage}, "
                           f"--precision {cfg.train.precision}, --mode {cfg.model.mode}) the parameters it would "
                           f"perturb are {', '.join(low)}, which round most of the perturbation away; use "
                           "--hypergrad exact, or --precision fp32"])


def forward(eng: Engine, batch: dict, meta: bool = False) -> torch.Tensor:
    """The PRM's step logits [N, K, 2], padded or packed batch (data.packing: position_ids, no mask).

    Meta passes call the module itself: the engine's forward hooks its outputs for engine.backward,
    which forbids the autograd.grad the meta pass uses; ZeRO-3's parameter gathering hooks sit on
    the submodules and still run."""
    b = to_device(batch, eng.ds.device)
    fn = eng.ds.module if meta else eng.ds
    if b.get("position_ids") is not None:
        return fn(b["input_ids"], None, b["tag_pos"], b["position_ids"])
    return fn(b["input_ids"], b["attention_mask"], b["tag_pos"])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------- inner update


def inner_update(eng: Engine, stream, wmod, baseline: bool, step: int, v=None) -> dict:
    """One PRM update: grad_accum weighted micro-batches, then the engine's step.

    Returns logging sums and the micro-batches (with detached features) for the meta pass.
    A non-finite instance loss on any rank stops before backward, naming step and ids.
    v (fused hypergradient, from fused_meta_gradient): the update's own backward also yields each
    instance's alignment a_i = <grad l_i, v> at the parameters before the update (recent[k]["align"]).
    """
    recent, sums = [], torch.zeros(4, dtype=torch.float64)  # loss*w, loss, n, tokens
    gas = eng.ds.gradient_accumulation_steps()
    batches = [to_device(next(stream), eng.ds.device) for _ in range(gas)]
    tap, slow, slow_names = (None, None, None) if v is None else _fused_tap(eng, v, batches)
    with tap or contextlib.nullcontext():
        for k, batch in enumerate(batches):
            if tap is not None:
                tap.begin(batch)
            logits = forward(eng, batch)
            losses = hypergrad.instance_losses(logits, batch, eng.step_loss)
            check_finite(losses, batch, f"inner loss at update {step}")
            feats = hypergrad.instance_features(logits, batch, losses)
            with torch.no_grad():
                w = torch.ones_like(losses) if baseline else wmod(batch["index"], batch["domain"], feats)
            loss = (w.to(losses.dtype) * losses).mean()
            eng.ds.backward(loss)
            r = {"batch": batch, "features": feats, "weights": w.detach(), "losses": losses.detach()}
            if tap is not None:  # the engine scales the loss by 1/gas: gradient = w_i / (B * gas) * grad l_i
                r["align"] = tap.result(w.detach().double() / (len(losses) * gas)).cpu() + slow[k]
            eng.ds.step()
            recent.append(r)
            sums += torch.tensor([(w * losses).sum().item(), losses.sum().item(), len(losses),
                                  batch["n_tokens"]], dtype=torch.float64)
    if tap is not None:
        v.check_order(f"fused alignments at update {step}")
    if tap is not None and tap.uncovered != slow_names:
        raise ModelError(f"--hypergrad fused: parameters {sorted(set(tap.uncovered) - set(slow_names))} do not fit "
                         "the per-sample formula (see dreamprm/persample.py) and cannot be handled inside the "
                         "training step; use --hypergrad exact, which takes them by the slow path")
    all_reduce_(sums)
    return {"loss": sums[0].item() / sums[2].item(), "loss_unweighted": sums[1].item() / sums[2].item(),
            "instances": int(sums[2].item()), "tokens": int(sums[3].item()), "recent": recent}


def _record_ids(batch: dict, rows) -> list:
    return [batch["ids"][i] if "ids" in batch else int(batch["index"][i]) for i in rows]


def _named_by_rank(local_ids: list) -> str:
    """'rank 0: [ids], rank 1: [ids]' over every rank that has any (a collective: call on all ranks)."""
    per_rank = all_gather_object(local_ids)
    return ", ".join(f"rank {r}: {ids}" for r, ids in enumerate(per_rank) if ids) or "none identified"


def check_finite(losses: torch.Tensor, batch: dict, what: str) -> None:
    """Raise on every rank if any rank saw a non-finite loss, naming the records of every rank."""
    bad = ~torch.isfinite(losses.detach())
    flag = all_reduce_(torch.tensor([float(bad.sum())]))
    if flag.item() > 0:
        named = _named_by_rank(_record_ids(batch, torch.nonzero(bad.cpu()).flatten().tolist()))
        raise NonFiniteError(f"non-finite {what}; records {named}. Nothing was applied to the PRM or the "
                             "weights; resume from the last checkpoint after fixing the data (dreamprm data "
                             "check) or lowering --lr.")


def check_meta_finite(align: list, recent: list, meta_batch: dict, meta_loss: float, step: int) -> None:
    """Raise on every rank if the meta loss or any rank's alignment is non-finite, naming the training
    records with a bad alignment (and the meta batch's records if the meta loss is bad) of every rank."""
    bad_local = [i for r, a in zip(recent, align)
                 for i in _record_ids(r["batch"], torch.nonzero(~torch.isfinite(a)).flatten().tolist())]
    meta_bad = not math.isfinite(meta_loss)
    flag = all_reduce_(torch.tensor([float(len(bad_local)), float(meta_bad)]))
    if flag.sum().item() == 0:
        return
    named = _named_by_rank(bad_local)
    meta_ids = _named_by_rank(_record_ids(meta_batch, range(len(meta_batch["index"])))) if meta_bad else ""
    raise NonFiniteError(f"non-finite meta pass at update {step}: meta loss {meta_loss}"
                         + (f" on meta records {meta_ids}" if meta_bad else "")
                         + f"; alignments non-finite for training records {named}. The weights were not "
                         "updated; resume from the last checkpoint after fixing the data or lowering --lr.")


# ---------------------------------------------------------------- meta update


class MetaGradient:
    """v, the meta-loss gradient (mean over ranks), per trainable parameter.

    ZeRO-3: each rank keeps only its shard of every parameter's v (what ZeRO's own backward
    reduce-scatter leaves in the gradient partitions, 1/world of the parameters' size); v[p]
    all-gathers one parameter's full slice when a hook needs it and drops it after use, as ZeRO
    gathers parameters. Every rank must ask for the same parameters in the same order (the hooks
    run in backward order, which is the same on every rank; check_order verifies it after each
    meta pass). Stages 0-2: full-shape tensors.
    """

    def __init__(self, parts: dict, sharded: bool):
        self.parts, self.sharded = parts, sharded
        self._order = 0  # a hash of the sequence of parameters gathered so far (check_order)

    def __getitem__(self, p: torch.Tensor) -> torch.Tensor:
        x = self.parts[p]
        if not self.sharded or dist.get_world_size() == 1:
            return x[:p.ds_numel].view(p.ds_shape) if self.sharded else x
        self._order = (self._order * 1_000_003 + p.ds_id + 1) % (2**61 - 1)
        full = x.new_empty(x.numel() * dist.get_world_size())
        dist.all_gather_into_tensor(full, x)
        return full[:p.ds_numel].view(p.ds_shape)

    def check_order(self, what: str) -> None:
        """Fail if the ranks gathered v's slices in different orders. Two parameters with shards of
        the same size gathered in swapped order would not hang but mix their slices silently."""
        if not self.sharded or dist.get_world_size() == 1:
            return
        t = all_reduce_(torch.tensor([self._order, -self._order], dtype=torch.int64), op=dist.ReduceOp.MAX)
        if t[0].item() != -t[1].item():
            raise CollectiveError(
                f"{what}: the ranks gathered the meta gradient's slices in different orders (the per-sample "
                "hooks did not run in the same order on every rank, e.g. layers chosen by the data); the "
                "alignments would mix parameters. Use --hypergrad finite_diff for this model")

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """The part of v that matches what this rank's forward reads for p (its shard under ZeRO-3)."""
        return self.parts[p].view_as(p.ds_tensor) if self.sharded else self.parts[p]

    def norm(self) -> float:
        sq = torch.stack([x.double().pow(2).sum() for x in self.parts.values()]).sum().reshape(1)
        return math.sqrt(all_reduce_(sq).item() if self.sharded else sq.item())

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.parts.values())


def meta_gradient(eng: Engine, meta_batch: dict, aggregation: str, kind: str):
    """(v, meta loss): v on the meta batch, mean over ranks (MetaGradient), at the current parameters.

    ZeRO-3: the engine's own backward reduce-scatters the gradient into ZeRO's partitions; the
    local shards are copied out (the caller then clears them with ds.optimizer.zero_grad()).
    Other stages: full-shape torch.autograd.grad, averaged over ranks with one all-reduce.
    """
    if eng.stage == 3:
        from deepspeed.utils import safe_get_local_grad

        lm = hypergrad.meta_loss(forward(eng, meta_batch), meta_batch, aggregation, kind)
        eng.ds.backward(lm, scale_wrt_gas=False)
        parts = {}
        for p in eng.params:
            g = safe_get_local_grad(p)
            parts[p] = (torch.zeros(p.ds_tensor.numel(), device=eng.ds.device) if g is None
                        else g.detach().float().flatten().clone())
        v = MetaGradient(parts, sharded=True)
    else:
        lm = hypergrad.meta_loss(forward(eng, meta_batch, meta=True), meta_batch, aggregation, kind)
        grads = torch.autograd.grad(lm, eng.params, allow_unused=True)
        g = [torch.zeros(p.shape, dtype=torch.float32, device=eng.ds.device) if g is None else g.float()
             for p, g in zip(eng.params, grads)]
        flat = torch.cat([x.flatten() for x in g])
        all_reduce_(flat)
        flat /= eng.world
        parts, i = {}, 0
        for p, x in zip(eng.params, g):
            parts[p] = flat[i:i + x.numel()].view_as(x)
            i += x.numel()
        v = MetaGradient(parts, sharded=False)
    loss = all_reduce_(lm.detach().float().reshape(1)).item() / eng.world
    return v, loss


def _local(eng: Engine, p: torch.Tensor, v: MetaGradient):
    """The tensor the forward reads for p on this rank, and the matching part of v."""
    return (p.ds_tensor.data if eng.stage == 3 else p.data), v.local(p)


def _params_changed(eng: Engine) -> None:
    if eng.stage == 3:  # gathered copies from the last forward would otherwise be reused
        eng.ds.optimizer.empty_partition_cache()


def fd_alignments(eng: Engine, recent: list, v: MetaGradient, radius: float):
    """a_i by central differences along v, parameters restored bit-exactly from a clone.

    Divides by the perturbation that landed (its component along v), not the nominal 2 eps."""
    vnorm = v.norm()
    eps = hypergrad.fd_epsilon(radius, vnorm)
    if eps == 0.0:
        return [torch.zeros(len(r["batch"]["index"])) for r in recent], vnorm
    local = [_local(eng, p, v) for p in eng.params]
    saved = [t.clone() for t, _ in local]
    losses, landed = {}, torch.zeros(1, dtype=torch.float64, device=eng.ds.device)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for (t, d), s in zip(local, saved):
                t.copy_(s.float().add(d, alpha=sign * eps).to(t.dtype))
                landed += sign * ((t.double() - s.double()) * d.double()).sum()
            _params_changed(eng)
            losses[sign] = [hypergrad.instance_losses(forward(eng, r["batch"], meta=True), r["batch"], eng.step_loss)
                            for r in recent]
        for (t, _), s in zip(local, saved):
            t.copy_(s)
        _params_changed(eng)
    if eng.stage == 3:  # each rank holds a shard of theta and of v
        all_reduce_(landed)
    span = landed.item() / vnorm ** 2
    return [hypergrad.fd_alignments(lp, lm, span).cpu() for lp, lm in zip(losses[1.0], losses[-1.0])], vnorm


def _alignments(eng: Engine, v: MetaGradient) -> persample.Alignments:
    module = eng.ds.module
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    return persample.Alignments(module, params, v, head=getattr(module, "score", None))


def _meta_losses(eng: Engine, b: dict) -> torch.Tensor:
    return hypergrad.instance_losses(forward(eng, b, meta=True), b, eng.step_loss)


def exact_alignments(eng: Engine, recent: list, v: MetaGradient):
    """a_i = <grad l_i, v> for every instance of each micro-batch from one forward and one activation
    backward (persample.exact). Under ZeRO-3 the hooks see each layer's input and output gradient
    in the forward/backward and gather that layer's slice of v (one all-gather per layer)."""
    vnorm = v.norm()
    module = eng.ds.module
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    out = []
    for r in recent:
        a, slow = persample.exact(module, params, v, r["batch"], lambda b: _meta_losses(eng, b),
                                  getattr(module, "score", None))
        if slow and tuple(slow) not in _SLOW_REPORTED:
            _SLOW_REPORTED.add(tuple(slow))
            log.warning("exact alignments: parameters %s are not covered by the per-sample hooks and take the "
                        "slow path (one forward and backward per instance)", slow)
        out.append(a.cpu())
    v.check_order("exact alignments")
    return out, vnorm


_SLOW_REPORTED: set = set()  # slow-path parameter sets already reported (once per process)


def _fused_tap(eng: Engine, v: MetaGradient, batches: list):
    """Hooks for the inner update's backward, and the slow-path part of a_i for parameters the hooks
    do not cover, taken before the update's first forward (same parameters; then the ZeRO buffers
    are cleared, as after the meta gradient)."""
    tap = _alignments(eng, v)
    names = tap.uncovered
    slow = [torch.zeros(len(b["index"])) for b in batches]
    if names:
        try:
            with persample.dropout_off(eng.ds.module):
                slow = [persample.slow_path(tap.params, tap.v, b, lambda x: _meta_losses(eng, x), names)
                        for b in batches]
        finally:
            eng.ds.optimizer.zero_grad()
    return tap, slow, names


def fused_meta_gradient(eng: Engine, meta_batch: dict, cfg: Config) -> dict:
    """Fused hypergradient, step 1 of 2 (before the inner update): v on the meta batch at the current
    parameters. Step 2 is inner_update(..., v=...), whose own backward yields the alignments."""
    m = cfg.meta
    meta_batch = to_device(meta_batch, eng.ds.device)
    try:
        with persample.dropout_off(eng.ds.module):
            v, lmeta = meta_gradient(eng, meta_batch, m.aggregation, m.meta_loss)
    finally:
        eng.ds.optimizer.zero_grad()  # what autograd.grad left in ZeRO's buffers
    return {"v": v, "meta_loss": lmeta, "v_norm": v.norm(), "meta_batch": meta_batch}


def exact_alignments_loop(eng: Engine, recent: list, v: MetaGradient):
    """The per-instance reference: one forward and backward per instance (tests only)."""
    out = []
    for r in recent:
        b = r["batch"]
        a = torch.zeros(len(b["index"]))
        for i in range(len(b["index"])):
            row = select(b, i)  # example i alone, unpadded, from either layout
            li = hypergrad.instance_losses(forward(eng, row, meta=True), row, eng.step_loss)[0]
            grads = torch.autograd.grad(li, eng.params, allow_unused=True)
            a[i] = sum((g.float() * v[p]).sum() for g, p in zip(grads, eng.params) if g is not None).item()
        out.append(a)
    return out


def meta_update(eng: Engine, meta_batch: dict | None, recent: list, wmod, wopt, cfg: Config, step: int,
                fused: dict | None = None) -> dict:
    """One meta pass (see module docstring). Leaves the PRM and its optimizer untouched.

    --hypergrad fused: meta_batch is None and `fused` is fused_meta_gradient's result; the alignments
    were taken by inner_update (recent[k]["align"]), so only the weight-module step is left.
    """
    m = cfg.meta
    if m.hypergrad == "fused":
        if fused is None or any("align" not in r for r in recent):
            raise ValueError("--hypergrad fused: call fused_meta_gradient before inner_update(..., v=...)")
        lmeta, vnorm, align = fused["meta_loss"], fused["v_norm"], [r["align"] for r in recent]
        meta_batch = fused["meta_batch"]
    else:
        meta_batch = to_device(meta_batch, eng.ds.device)
        lmeta, vnorm, align = _meta_alignments(eng, meta_batch, recent, cfg)
    return _weight_step(eng, recent, align, meta_batch, lmeta, vnorm, wmod, wopt, step)


def _meta_alignments(eng: Engine, meta_batch: dict, recent: list, cfg: Config):
    m = cfg.meta
    meta_batch = to_device(meta_batch, eng.ds.device)
    # No dropout (the +/- passes and the reference must see the same function), but train mode:
    # eval() would also switch gradient checkpointing off for the meta forward and backward.
    try:
        with persample.dropout_off(eng.ds.module):
            v, lmeta = meta_gradient(eng, meta_batch, m.aggregation, m.meta_loss)
            if m.hypergrad == "exact":
                align, vnorm = exact_alignments(eng, recent, v)
            else:
                align, vnorm = fd_alignments(eng, recent, v, m.fd_radius)
    finally:
        eng.ds.optimizer.zero_grad()  # what autograd.grad left in ZeRO's buffers
    return lmeta, vnorm, align


def _weight_step(eng: Engine, recent: list, align: list, meta_batch: dict, lmeta: float, vnorm: float, wmod, wopt,
                 step: int) -> dict:
    """The weight module's step from the alignments (summed over ranks)."""
    check_meta_finite(align, recent, meta_batch, lmeta, step)
    n_local = sum(len(a) for a in align)
    n_global = int(all_reduce_(torch.tensor([float(n_local)])).item())
    a_all = torch.cat(align)
    wopt.zero_grad()
    obj = sum(hypergrad.weight_objective(
        wmod(r["batch"]["index"].cpu(), r["batch"]["domain"].cpu(), r["features"].cpu()), a, n_global)
        for r, a in zip(recent, align))
    obj.backward()
    for p in wmod.parameters():
        if p.grad is not None:
            all_reduce_(p.grad)
    wopt.step()
    with torch.no_grad():  # the instance net's running level: the global batch mean
        w = torch.cat([wmod.positive(r["batch"]["index"].cpu(), r["batch"]["domain"].cpu(), r["features"].cpu())
                       for r in recent])
        mean = all_reduce_(torch.tensor([w.sum().item(), float(len(w))]))
    wmod.observe(mean[0] / mean[1])
    return {"meta_loss": lmeta, "v_norm": vnorm,
            "align_mean": all_reduce_(torch.tensor([a_all.sum().item()])).item() / max(1, n_global)}


# ---------------------------------------------------------------- checkpoints
# File names, the manifest, verification and pruning live in checkpoint.py (no deepspeed);
# here: writing and loading through the engine, every rank agreeing on the outcome.


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _on_every_rank(fn, folder: Path):
    """Run fn here; returns (its result, the failures of all ranks) so that every rank raises
    together instead of leaving the others waiting in the next collective."""
    result, err = None, None
    try:
        result = fn()
    except (OSError, RuntimeError) as e:  # torch's C++ file writer raises RuntimeError
        err = f"rank {dist.get_rank() if dist.is_initialized() else 0}: {ckpt.write_problem(e, folder)}"
    return result, [e for e in all_gather_object(err) if e]


def save_checkpoint(eng: Engine, root: Path, step: int, shared: dict, per_rank: dict, keep_last: int,
                    parent: str | None = None, keep=()) -> tuple[Path, list[str]]:
    """Write a checkpoint atomically: into <tag>.tmp, manifest (sizes and SHA-256) last,
    rename, then `latest`, then prune the lineage (checkpoint.prune; keep: never deleted).

    shared (rank 0's copy is written) holds the weight module, its optimizer, the config;
    per_rank holds the data positions; the RNG state is added here. parent: the checkpoint
    this one continues from. Returns the folder and messages about old checkpoints that
    could not be deleted. A failed write (disk full, read-only, no permission) on any rank
    removes the partial folder and raises CheckpointError on every rank naming the cause and
    the last complete checkpoint.
    """
    name = ckpt.tag(step)
    final, tmp = root / name, root / f"{name}.tmp"

    def fail(errors):  # errors: "rank R: cause" of every rank that failed
        if eng.rank == 0 and tmp.exists():
            ckpt.remove_tree(tmp)
        last = ckpt.latest(root) if (root / ckpt.LATEST).is_file() else None
        ranks = ", ".join(e.split(":", 1)[0].removeprefix("rank ") for e in errors)
        raise CheckpointError(f"{errors[0].split(': ', 1)[1]} while writing checkpoint {name} in {root} "
                              f"(rank {ranks}); the partial folder was removed; the last complete checkpoint "
                              f"is {last.name if last else 'none (nothing to resume from)'}")

    def prepare():
        if eng.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                err = ckpt.remove_tree(tmp)
                if err:
                    raise OSError(err)

    def write():
        eng.ds.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        torch.save({**per_rank, "rng": _rng_state()}, tmp / ckpt.rank_file(eng.rank))
        if eng.rank == 0:
            torch.save({**shared, "step": step, "world": eng.world, "stage": eng.stage}, tmp / ckpt.SHARED_STATE)

    def describe():  # each rank reads a share of the files (cost per GB: bench/checksum.py)
        return ckpt.describe_files(tmp, ckpt.list_files(tmp)[eng.rank::eng.world])

    for fn in (prepare, write):
        _, errors = _on_every_rank(fn, root)
        if errors:
            fail(errors)
    mine, errors = _on_every_rank(describe, root)
    if errors:
        fail(errors)
    files = {k: v for part in all_gather_object(mine) for k, v in part.items()}

    def publish():
        if eng.rank != 0:
            return []
        ckpt.write_manifest(tmp, step, eng.world, eng.stage, parent, files)
        if final.exists():  # the same step of an earlier (rolled back) history
            err = ckpt.remove_tree(final)
            if err:
                raise OSError(err)
        os.replace(tmp, final)
        ckpt.fsync_dir(root)
        ckpt.write_latest(root, name)
        return ckpt.prune(root, final, keep_last, keep)
    notes, errors = _on_every_rank(publish, root)
    if errors:
        fail(errors)
    return final, notes or []


def verify_on_every_rank(path: Path) -> tuple[dict | None, list[str]]:
    """Check a checkpoint with every rank reading a share of the checksums; returns (manifest,
    problems), the same on every rank. Problems are empty for an intact checkpoint."""
    try:
        man = ckpt.read_manifest(path)
    except CheckpointError as e:
        return None, [str(e)]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bad = sorted({b for part in all_gather_object(ckpt.file_problems(path, man, rank, world)) for b in part})
    return man, ([str(ckpt.damaged_error(path, bad))] if bad else [])


def universal_copy(path: Path, world: int, rank: int) -> Path | None:
    """For a checkpoint of another world size, its DeepSpeed universal form (per-parameter
    fp32 weights and Adam moments, independent of the rank count), written by rank 0 next to
    the checkpoints as universal/<tag> and loaded through the engine (create_engine with
    load_universal). None when the checkpoint loads as it is: same world, or ZeRO stage 0,
    whose model states file holds the whole optimizer. The other ranks wait meanwhile."""
    man = ckpt.read_manifest(path)
    if man["world"] == world or man["stage"] == 0:
        return None
    out = path.parent / "universal" / path.name
    err = None
    if rank == 0:  # always afresh: a leftover may come from an older checkpoint of the same name
        tmp = out.with_name(out.name + ".tmp")
        for old in (tmp, out):
            err = err or (ckpt.remove_tree(old) if old.exists() else None)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "2"]
        if man["stage"] < 3:  # ZeRO-1/2 checkpoints lack the Megatron-style layout info it asks for
            cmd.append("--inject_missing_state")
        if not err:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                os.replace(tmp, out)
            else:
                err = (f"could not convert {path} (written by {man['world']} ranks, ZeRO stage {man['stage']}) "
                       f"for {world} ranks: {' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2000:]}\nresume on "
                       f"{man['world']} ranks instead")
                ckpt.remove_tree(tmp)
    err = broadcast_object(err)
    if err:
        raise CheckpointError(err)
    return out


def load_checkpoint(eng: Engine, path: Path, universal: Path | None = None) -> tuple[dict, dict, int]:
    """Load a checkpoint that verify_on_every_rank passed into the engine (from its universal
    form when given); returns the shared state, this rank's data positions and the world size
    that wrote it. The RNG state is restored here; a rank the checkpoint did not have takes
    that of rank (rank mod old world)."""
    man = ckpt.read_manifest(path)
    if man["world"] != eng.world and man["stage"] > 0 and universal is None:
        raise CheckpointError(f"{path} was written by {man['world']} ranks, this run has {eng.world}: load it "
                              "through universal_copy")
    src = universal or path
    loaded, _ = eng.ds.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {src}")
    shared = ckpt.shared_state(path)
    per_rank = torch.load(path / ckpt.rank_file(eng.rank % man["world"]), weights_only=True)
    _set_rng_state(per_rank["rng"])
    return shared, per_rank, man["world"]


def consolidated_state_dict(path: Path) -> dict:
    """The full fp32 state dict of the PRM module in a checkpoint, for any ZeRO stage.

    Keys are the training module's (peft names under LoRA). Verifies completeness first.
    """
    man = ckpt.verify(path)
    if man["stage"] >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    states = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}


def gathered_state_dict(eng: Engine, fn):
    """Run fn(module) on rank 0 with every parameter whole (ZeRO-3 gathers); None elsewhere."""
    module = eng.ds.module
    if eng.stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            out = fn(module) if eng.rank == 0 else None
        return out
    return fn(module) if eng.rank == 0 else None


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

