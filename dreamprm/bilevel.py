"""The bilevel step: how the instance weights learn from the meta batch, outside the DeepSpeed wrapper.

meta_update runs right after an inner update (so the engine holds no accumulated gradients):
  1. v = the gradient of the meta loss on a meta batch at the current parameters, mean over ranks
     (meta_gradient; under ZeRO-3 each rank keeps its shard, MetaGradient);
  2. a_i = <grad l_i, v> for the instances of the last update: exact (persample hooks, one forward and
     activation backward per micro-batch) or finite differences along v (parameters restored bit-exactly);
  3. the weight module's gradient from hypergrad.weight_objective, summed over ranks, then its own
     optimizer step (weight_step).
Afterwards the engine's zero_grad clears what step 1 left in ZeRO's gradient partitions, where the next
training backward would add onto it (the ZeRO optimizer's zero_grad: DeepSpeed's engine.zero_grad only drops
p.grad), so the PRM, its optimizer state and the rest of the trajectory are bit-identical to a run without
the meta pass (tests/test_bilevel.py).
--hypergrad fused moves step 1 before the update (fused_meta_gradient) and step 2 into it: the engine's
inner_update runs its backward with a FusedTap, the same hooks inside the update's own backward.

The math is plain torch (hypergrad.py, persample.py); collectives come from dist.py; the engine is
reached only through its accessors (module, params, sharded, device, forward, meta_backward, local_grad,
local_tensor, params_changed, zero_grad, step_loss), so this module never imports DeepSpeed. ZeRO-3
parameters are read through their attributes (ds_numel, ds_shape, ds_id, ds_tensor).
"""

from __future__ import annotations

import logging
import math

import torch

from dreamprm import dist, hypergrad, persample
from dreamprm.config import Config
from dreamprm.errors import CollectiveError, ModelError, NonFiniteError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- step 1: v


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
        if not self.sharded or dist.rank_world()[1] == 1:
            return x[:p.ds_numel].view(p.ds_shape) if self.sharded else x
        self._order = (self._order * 1_000_003 + p.ds_id + 1) % (2**61 - 1)
        return dist.all_gather_into_tensor(x)[:p.ds_numel].view(p.ds_shape)

    def check_order(self, what: str) -> None:
        """Fail if the ranks gathered v's slices in different orders. Two parameters with shards of
        the same size gathered in swapped order would not hang but mix their slices silently."""
        if not self.sharded or dist.rank_world()[1] == 1:
            return
        t = dist.all_reduce_(torch.tensor([self._order, -self._order], dtype=torch.int64), op=dist.ReduceOp.MAX)
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
        return math.sqrt(dist.all_reduce_(sq).item() if self.sharded else sq.item())

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.parts.values())


def meta_gradient(eng, meta_batch: dict, aggregation: str, kind: str):
    """(v, meta loss): v on the meta batch, mean over ranks (MetaGradient), at the current parameters.

    ZeRO-3: the engine's own backward reduce-scatters the gradient into ZeRO's partitions; the
    local shards are copied out (the caller then clears them with eng.zero_grad()).
    Other stages: full-shape torch.autograd.grad, averaged over ranks with one all-reduce.
    """
    if eng.sharded:
        lm = hypergrad.meta_loss(eng.forward(meta_batch), meta_batch, aggregation, kind)
        eng.meta_backward(lm)
        parts = {}
        for p in eng.params:
            g = eng.local_grad(p)
            parts[p] = (torch.zeros(p.ds_tensor.numel(), device=eng.device) if g is None
                        else g.detach().float().flatten().clone())
        v = MetaGradient(parts, sharded=True)
    else:
        lm = hypergrad.meta_loss(eng.forward(meta_batch, meta=True), meta_batch, aggregation, kind)
        grads = torch.autograd.grad(lm, eng.params, allow_unused=True)
        g = [torch.zeros(p.shape, dtype=torch.float32, device=eng.device) if g is None else g.float()
             for p, g in zip(eng.params, grads)]
        flat = torch.cat([x.flatten() for x in g])
        dist.all_reduce_(flat)
        flat /= eng.world
        parts, i = {}, 0
        for p, x in zip(eng.params, g):
            parts[p] = flat[i:i + x.numel()].view_as(x)
            i += x.numel()
        v = MetaGradient(parts, sharded=False)
    loss = dist.all_reduce_(lm.detach().float().reshape(1)).item() / eng.world
    return v, loss


# ---------------------------------------------------------------- step 2: the alignments a_i


def _meta_losses(eng, b: dict) -> torch.Tensor:
    return hypergrad.instance_losses(eng.forward(b, meta=True), b, eng.step_loss)


def _trainable(eng) -> dict:
    return {n: p for n, p in eng.module.named_parameters() if p.requires_grad}


_SLOW_REPORTED: set = set()  # slow-path parameter sets already reported (once per process)


def exact_alignments(eng, recent: list, v: MetaGradient):
    """a_i = <grad l_i, v> for every instance of each micro-batch from one forward and one activation
    backward (persample.exact). Under ZeRO-3 the hooks see each layer's input and output gradient
    in the forward/backward and gather that layer's slice of v (one all-gather per layer)."""
    vnorm = v.norm()
    module = eng.module
    params = _trainable(eng)
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


def fd_alignments(eng, recent: list, v: MetaGradient, radius: float):
    """a_i by central differences along v, parameters restored bit-exactly from a clone.

    Divides by the perturbation that landed (its component along v), not the nominal 2 eps."""
    vnorm = v.norm()
    eps = hypergrad.fd_epsilon(radius, vnorm)
    if eps == 0.0:
        return [torch.zeros(len(r["batch"]["index"])) for r in recent], vnorm
    local = [(eng.local_tensor(p), v.local(p)) for p in eng.params]  # what the forward reads, and v's part
    saved = [t.clone() for t, _ in local]
    losses, landed = {}, torch.zeros(1, dtype=torch.float64, device=eng.device)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for (t, d), s in zip(local, saved):
                t.copy_(s.float().add(d, alpha=sign * eps).to(t.dtype))
                landed += sign * ((t.double() - s.double()) * d.double()).sum()
            eng.params_changed()
            losses[sign] = [_meta_losses(eng, r["batch"]) for r in recent]
        for (t, _), s in zip(local, saved):
            t.copy_(s)
        eng.params_changed()
    if eng.sharded:  # each rank holds a shard of theta and of v
        dist.all_reduce_(landed)
    span = landed.item() / vnorm ** 2
    return [hypergrad.fd_alignments(lp, lm, span).cpu() for lp, lm in zip(losses[1.0], losses[-1.0])], vnorm


def _alignments(eng, meta_batch: dict, recent: list, cfg: Config):
    """Steps 1 and 2 for exact and finite_diff: (meta loss, ||v||, a_i per micro-batch)."""
    m = cfg.meta
    # No dropout (the +/- passes and the reference must see the same function), but train mode:
    # eval() would also switch gradient checkpointing off for the meta forward and backward.
    try:
        with persample.dropout_off(eng.module):
            v, lmeta = meta_gradient(eng, meta_batch, m.aggregation, m.meta_loss)
            if m.hypergrad == "exact":
                align, vnorm = exact_alignments(eng, recent, v)
            else:
                align, vnorm = fd_alignments(eng, recent, v, m.fd_radius)
    finally:
        eng.zero_grad()  # what step 1 left in ZeRO's buffers
    return lmeta, vnorm, align


# ---------------------------------------------------------------- --hypergrad fused


class FusedTap:
    """Step 2 inside the inner update's own backward (engine.inner_update(..., tap=...)).

    The engine calls: start(batches) before the update's first forward (the slow-path part of a_i for
    parameters the hooks do not cover, at the same parameters; then ZeRO's buffers are cleared, as
    after the meta gradient), `with tap:` around the micro-batches, begin(batch) before each forward,
    result(k, scaled_weights) after micro-batch k's backward (scaled_weights: the c_i of the loss that
    was backpropagated), finish(step) after the update.
    """

    def __init__(self, eng, v: MetaGradient):
        self.eng, self.v = eng, v
        self.hooks = persample.Alignments(eng.module, _trainable(eng), v, head=getattr(eng.module, "score", None))
        self.slow_names = self.hooks.uncovered
        self.slow = []

    def start(self, batches: list) -> None:
        self.slow = [torch.zeros(len(b["index"])) for b in batches]
        if self.slow_names:
            try:
                with persample.dropout_off(self.eng.module):
                    self.slow = [persample.slow_path(self.hooks.params, self.hooks.v, b,
                                                     lambda x: _meta_losses(self.eng, x), self.slow_names)
                                 for b in batches]
            finally:
                self.eng.zero_grad()

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def begin(self, batch: dict) -> None:
        self.hooks.begin(batch)

    def result(self, k: int, scaled_weights: torch.Tensor) -> torch.Tensor:
        return self.hooks.result(scaled_weights).cpu() + self.slow[k]

    def finish(self, step: int) -> None:
        self.v.check_order(f"fused alignments at update {step}")
        if self.hooks.uncovered != self.slow_names:
            raise ModelError(f"--hypergrad fused: parameters {sorted(set(self.hooks.uncovered) - set(self.slow_names))}"
                             " do not fit the per-sample formula (see dreamprm/persample.py) and cannot be handled "
                             "inside the training step; use --hypergrad exact, which takes them by the slow path")


def fused_meta_gradient(eng, meta_batch: dict, cfg: Config) -> dict:
    """Fused hypergradient, step 1 of 2 (before the inner update): v on the meta batch at the current
    parameters, and the tap for inner_update(..., tap=result["tap"]), whose own backward yields the alignments."""
    m = cfg.meta
    meta_batch = eng.to_device(meta_batch)
    try:
        with persample.dropout_off(eng.module):
            v, lmeta = meta_gradient(eng, meta_batch, m.aggregation, m.meta_loss)
    finally:
        eng.zero_grad()  # what autograd.grad left in ZeRO's buffers
    return {"v": v, "meta_loss": lmeta, "v_norm": v.norm(), "meta_batch": meta_batch, "tap": FusedTap(eng, v)}


# ---------------------------------------------------------------- step 3: the weight step


def meta_update(eng, meta_batch: dict | None, recent: list, wmod, wopt, cfg: Config, step: int,
                fused: dict | None = None) -> dict:
    """One meta pass (see the module docstring). Leaves the PRM and its optimizer untouched.

    --hypergrad fused: meta_batch is None and `fused` is fused_meta_gradient's result; the alignments
    were taken by inner_update (recent[k]["align"]), so only the weight-module step is left.
    """
    if cfg.meta.hypergrad == "fused":
        if fused is None or any("align" not in r for r in recent):
            raise ValueError("--hypergrad fused: call fused_meta_gradient before inner_update(..., tap=...)")
        lmeta, vnorm, align = fused["meta_loss"], fused["v_norm"], [r["align"] for r in recent]
        meta_batch = fused["meta_batch"]
    else:
        meta_batch = eng.to_device(meta_batch)
        lmeta, vnorm, align = _alignments(eng, meta_batch, recent, cfg)
    return weight_step(recent, align, meta_batch, lmeta, vnorm, wmod, wopt, step)


def weight_step(recent: list, align: list, meta_batch: dict, lmeta: float, vnorm: float, wmod, wopt,
                step: int) -> dict:
    """The weight module's step from the alignments (summed over ranks)."""
    check_meta_finite(align, recent, meta_batch, lmeta, step)
    n_local = sum(len(a) for a in align)
    n_global = int(dist.all_reduce_(torch.tensor([float(n_local)])).item())
    a_all = torch.cat(align)
    wopt.zero_grad()
    obj = sum(hypergrad.weight_objective(
        wmod(r["batch"]["index"].cpu(), r["batch"]["domain"].cpu(), r["features"].cpu()), a, n_global)
        for r, a in zip(recent, align))
    obj.backward()
    for p in wmod.parameters():
        if p.grad is not None:
            dist.all_reduce_(p.grad)
    wopt.step()
    with torch.no_grad():  # the instance net's running level: the global batch mean
        w = torch.cat([wmod.positive(r["batch"]["index"].cpu(), r["batch"]["domain"].cpu(), r["features"].cpu())
                       for r in recent])
        mean = dist.all_reduce_(torch.tensor([w.sum().item(), float(len(w))]))
    wmod.observe(mean[0] / mean[1])
    return {"meta_loss": lmeta, "v_norm": vnorm,
            "align_mean": dist.all_reduce_(torch.tensor([a_all.sum().item()])).item() / max(1, n_global)}


# ---------------------------------------------------------------- finiteness


def _record_ids(batch: dict, rows) -> list:
    return [batch["ids"][i] if "ids" in batch else int(batch["index"][i]) for i in rows]


def _named_by_rank(local_ids: list) -> str:
    """'rank 0: [ids], rank 1: [ids]' over every rank that has any (a collective: call on all ranks)."""
    per_rank = dist.all_gather_object(local_ids)
    return ", ".join(f"rank {r}: {ids}" for r, ids in enumerate(per_rank) if ids) or "none identified"


def check_finite(losses: torch.Tensor, batch: dict, what: str) -> None:
    """Raise on every rank if any rank saw a non-finite loss, naming the records of every rank."""
    bad = ~torch.isfinite(losses.detach())
    flag = dist.all_reduce_(torch.tensor([float(bad.sum())]))
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
    flag = dist.all_reduce_(torch.tensor([float(len(bad_local)), float(meta_bad)]))
    if flag.sum().item() == 0:
        return
    named = _named_by_rank(bad_local)
    meta_ids = _named_by_rank(_record_ids(meta_batch, range(len(meta_batch["index"])))) if meta_bad else ""
    raise NonFiniteError(f"non-finite meta pass at update {step}: meta loss {meta_loss}"
                         + (f" on meta records {meta_ids}" if meta_bad else "")
                         + f"; alignments non-finite for training records {named}. The weights were not "
                         "updated; resume from the last checkpoint after fixing the data or lowering --lr.")
