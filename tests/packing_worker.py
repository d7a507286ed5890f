"""Run under torchrun by tests/test_packing_train.py: 5 updates of the bilevel loop, recorded.

    torchrun --nproc_per_node 2 tests/packing_worker.py OUT_DIR [train.py flags...]

The loop of dreamprm.train.train_loop (inner_update, then meta_update every update) on the demo data with the
batches data.sources.collate_fn gives (--packing or not), the meta pass alternating exact (odd updates) and
finite differences (even). Saves per rank: every instance's loss and weight by record id, the meta
losses and alignment means; rank 0 also saves the final instance weights and the gathered trainable
parameters.
"""

import sys
from pathlib import Path

import torch

from engine_worker import gathered_state_dict

from dreamprm import bilevel, engine
from dreamprm.config import load_config
from dreamprm.data.loader import BatchStream
from dreamprm.data.packing import is_packed
from dreamprm.data.sources import collate_fn, run_data
from dreamprm.hypergrad import StepLoss
from dreamprm.weights import build_weight_module, build_weight_optimizer


def main():
    out_dir = Path(sys.argv[1])
    cfg, _ = load_config(sys.argv[2:])
    rank, world = engine.init_distributed()
    eng = engine.create_engine(cfg, rank, world, StepLoss())
    data = run_data(cfg, eng.tokenizer, rank, needs_meta=True, world=world)
    train_ex, meta_ex, domains = data.train_ex, data.meta_ex, data.domains
    pad, coll = eng.tokenizer.pad_token_id, collate_fn(cfg)
    train = BatchStream(train_ex, cfg.train.batch_size, pad, rank, world, cfg.train.seed, collate_fn=coll)
    meta = BatchStream(meta_ex, cfg.meta.meta_batch_size, pad, rank, world, cfg.train.seed + 1, collate_fn=coll)
    torch.manual_seed(1)
    wmod = build_weight_module(cfg.meta.weights, [ex.domain for ex in train_ex], len(domains), cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta)
    res = {"losses": {}, "weights": {}, "meta_loss": [], "align_mean": [], "packed": []}
    for step in range(1, cfg.train.total_steps + 1):
        out = engine.inner_update(eng, train, wmod, False, step)
        for r in out["recent"]:
            res["packed"].append(is_packed(r["batch"]))
            for i, rid in enumerate(r["batch"]["ids"]):
                res["losses"][(step, rid)] = r["losses"][i].item()
                res["weights"][(step, rid)] = r["weights"][i].item()
        cfg.meta.hypergrad = "exact" if step % 2 else "finite_diff"
        m = bilevel.meta_update(eng, next(meta), out["recent"], wmod, wopt, cfg, step)
        res["meta_loss"].append(m["meta_loss"])
        res["align_mean"].append(m["align_mean"])
    torch.save(res, out_dir / f"rank{rank}.pt")
    eng.params_changed()  # ZeRO-3: the meta pass calls the module directly; release what its hooks still hold
    state = gathered_state_dict(eng, lambda mod: {n: p.detach().float().clone()
                                                  for n, p in mod.named_parameters() if p.requires_grad})
    if rank == 0:
        torch.save({"params": state, "table": wmod.instance_weights().clone()}, out_dir / "final.pt")


if __name__ == "__main__":
    main()
    engine.close_distributed()
