"""Run under torchrun by tests/test_bilevel.py: one inner update, then meta passes.

    torchrun --nproc_per_node 2 tests/engine_worker.py OUT_DIR [train.py flags...]

After one real inner update on the demo data, it runs a meta pass for every hypergradient
method x weight module, each with a freshly seeded weight module, and saves per rank: the
weight module's gradient, the batches the pass used, and whether the PRM's local
parameters, fp32 master copies and Adam state were bit-identical before and after. Rank 0
also saves the gathered PRM state dict for the single-process reference.
"""

import sys
from pathlib import Path

import deepspeed
import torch

from dreamprm import bilevel, dist, engine, hypergrad, persample
from dreamprm.config import load_config
from dreamprm.data.loader import BatchStream
from dreamprm.data.packing import select
from dreamprm.data.sources import run_data, step_loss
from dreamprm.model import training_tokenizer
from dreamprm.weights import build_weight_module, build_weight_optimizer

KINDS = ("instance_table", "instance_net", "domain_table", "instance_domain_table")
METHODS = ("exact", "finite_diff")


def _leaves(obj, path=""):
    """(path, value) for every tensor and number inside a nested state dict, cloned."""
    if torch.is_tensor(obj):
        yield path, obj.detach().clone()
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _leaves(x, f"{path}/{i}")
    elif isinstance(obj, (int, float, bool)):
        yield path, obj


def snapshot(eng):
    """The PRM's local parameters and the WHOLE optimizer state (fp32 masters, both Adam moments, step
    counts, loss scaler...), as DeepSpeed would checkpoint it."""
    out = {f"param{i}": (p.ds_tensor if eng.stage == 3 else p.data).detach().clone()
           for i, p in enumerate(eng.params)}
    out.update(_leaves(eng.ds.optimizer.state_dict(), "optimizer"))
    return out


def same(before: dict, after: dict) -> bool:
    assert before.keys() == after.keys() and any("exp_avg_sq" in k for k in before) and \
        any(k.endswith("/step") for k in before), sorted(before)[:20]
    return all(torch.equal(a, after[k]) if torch.is_tensor(a) else a == after[k] for k, a in before.items())


def gathered_state_dict(eng, fn):
    """Run fn(module) on rank 0 with every parameter whole (ZeRO-3 gathers); None elsewhere."""
    module = eng.module
    if eng.sharded:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            out = fn(module) if eng.rank == 0 else None
        return out
    return fn(module) if eng.rank == 0 else None


def exact_alignments_loop(eng, recent: list, v):
    """The per-instance reference for bilevel.exact_alignments: one forward and backward per instance.
    (alignments, ||grad l_i|| of each instance) per micro-batch."""
    out, norms = [], []
    for r in recent:
        b = r["batch"]
        a, gn = torch.zeros(len(b["index"])), torch.zeros(len(b["index"]))
        for i in range(len(b["index"])):
            row = select(b, i)  # example i alone, unpadded, from either layout
            li = hypergrad.instance_losses(eng.forward(row, meta=True), row, eng.step_loss)[0]
            grads = torch.autograd.grad(li, eng.params, allow_unused=True)
            a[i] = sum((g.float() * v[p]).sum() for g, p in zip(grads, eng.params) if g is not None).item()
            gn[i] = sum((g.double() ** 2).sum() for g in grads if g is not None).sqrt().item()
        out.append(a)
        norms.append(gn)
    return out, norms


def main():
    out_dir = Path(sys.argv[1])
    cfg, _ = load_config(sys.argv[2:])
    rank, world = engine.init_distributed()
    torch.manual_seed(cfg.train.seed)
    tok = training_tokenizer(cfg.model)
    data = run_data(cfg, tok, rank, needs_meta=True)
    train_ex, meta_ex, domains = data.train_ex, data.meta_ex, data.domains
    eng = engine.create_engine(cfg, rank, world, step_loss(cfg, data.pos_fraction), tokenizer=tok)
    pad = eng.tokenizer.pad_token_id
    train = BatchStream(train_ex, cfg.train.batch_size, pad, rank, world, cfg.train.seed)
    meta = BatchStream(meta_ex, cfg.meta.meta_batch_size, pad, rank, world, cfg.train.seed + 1)
    torch.manual_seed(1)
    w0 = build_weight_module("instance_table", [ex.domain for ex in train_ex], len(domains), cfg.meta.net_hidden)
    out = engine.inner_update(eng, train, w0, False, 1)
    meta_batch = next(meta)
    state = gathered_state_dict(eng, lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()})
    result = {"recent": [{"batch": r["batch"], "features": r["features"]} for r in out["recent"]],
              "meta_batch": meta_batch, "grads": {}, "identical": {},
              "train_domains": [ex.domain for ex in train_ex],
              "n_domains": len(domains), "pos_fraction": data.pos_fraction, "step_loss": eng.step_loss,
              "dtypes": {n: p.dtype for n, p in eng.module.named_parameters()}}
    # hook alignments vs the per-instance loop, on this rank's micro-batches, same v
    with persample.dropout_off(eng.module):
        v, _ = bilevel.meta_gradient(eng, eng.to_device(meta_batch), cfg.meta.aggregation, cfg.meta.meta_loss)
        hook, _ = bilevel.exact_alignments(eng, out["recent"], v)
        loop, gnorm = exact_alignments_loop(eng, out["recent"], v)
    eng.zero_grad()
    result["align_hook"], result["align_loop"] = torch.cat(hook), torch.cat(loop)
    result["align_gnorm"], result["align_vnorm"] = torch.cat(gnorm), v.norm()
    for method in METHODS:
        cfg.meta.hypergrad = method
        for kind in KINDS:
            torch.manual_seed(123)
            wmod = build_weight_module(kind, [ex.domain for ex in train_ex], len(domains), cfg.meta.net_hidden)
            wopt = build_weight_optimizer(wmod, cfg.meta)
            before = snapshot(eng)
            bilevel.meta_update(eng, meta_batch, out["recent"], wmod, wopt, cfg, 1)
            after = snapshot(eng)
            result["identical"][(method, kind)] = same(before, after)
            result["grads"][(method, kind)] = torch.cat([p.grad.flatten() for p in wmod.parameters()
                                                         if p.grad is not None])
    # the engine still trains normally after the meta passes
    out2 = engine.inner_update(eng, train, w0, False, 2)
    result["loss_after"] = out2["loss"]
    # fused: v before the next update, alignments from that update's own backward, against the
    # per-instance loop on the same micro-batches at the same parameters (dropout off for both)
    peek = BatchStream(train_ex, cfg.train.batch_size, pad, rank, world, cfg.train.seed)
    peek.load_state_dict(train.state_dict())
    upcoming = [{"batch": eng.to_device(next(peek))} for _ in range(cfg.train.grad_accum)]
    cfg.meta.hypergrad = "fused"
    pre = bilevel.fused_meta_gradient(eng, meta_batch, cfg)
    with persample.dropout_off(eng.module):
        loop, gnorm = exact_alignments_loop(eng, upcoming, pre["v"])
        eng.zero_grad()
        out3 = engine.inner_update(eng, train, w0, False, 3, tap=pre["tap"])
    assert all(torch.equal(a["batch"]["index"], b["batch"]["index"]) for a, b in zip(upcoming, out3["recent"]))
    result["fused_align"] = torch.cat([r["align"] for r in out3["recent"]])
    result["fused_loop"] = torch.cat(loop)
    result["fused_gnorm"], result["fused_vnorm"] = torch.cat(gnorm), pre["v"].norm()
    torch.manual_seed(123)
    wmod = build_weight_module("instance_net", [ex.domain for ex in train_ex], len(domains), cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta)
    result["fused_meta"] = bilevel.meta_update(eng, None, out3["recent"], wmod, wopt, cfg, 3, fused=pre)
    torch.save(result, out_dir / f"rank{rank}.pt")
    if rank == 0:
        torch.save(state, out_dir / "prm_state.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
    engine.close_distributed()
