"""Per-rank memory and communication of a PRM update and of its meta pass under ZeRO-3, from formulas.

    python bench/scaling.py                      # Qwen2.5-7B and 72B shapes, LoRA r=16 and full, 8-256 GPUs
    python bench/scaling.py --tokens 8192 --flops 400e12 --bw_inter 50e9

Nothing is measured: the byte counts are what dreamprm's code paths move and keep (dreamprm/bilevel.py,
dreamprm/engine/, dreamprm/persample.py), with bf16 weights, fp32 master weights, Adam, ZeRO-3 over all ranks and
micro-batch 1. N = all backbone + head parameters, n = trainable ones (N for full fine-tuning).

Per rank, model states:   full 16 N / W (bf16 weight 2 + bf16 gradient partition 2 + fp32 master 4 + Adam 8)
                          LoRA  2 N / W + 16 n / W
Meta pass, extra memory:  exact / fused: v's shards 4 n / W (fp32), plus one gathered slice of v while that
                          layer's hook runs (4 bytes x its largest trainable tensor: the embedding for full
                          fine-tuning); before this change: v at full shape 4 n, its flat copy 4 n and the
                          full-shape bf16 autograd gradients 2 n on every rank (10 n).
Bytes a rank receives per micro-batch (ring collectives, x (W-1)/W):
  inner update            all-gather of the weights in forward 2 N and again in backward 2 N, reduce-scatter of
                          the trainable gradients 2 n: 4 N + 2 n
  meta pass (per meta     v: one meta micro-batch, same as an inner one: 4 N + 2 n
  update, on top)         exact: + per training micro-batch 4 N (forward + activation backward) + 4 n (v slices)
                          fused: + per training micro-batch 4 n (v slices inside the update's own backward)
                          finite_diff: + per training micro-batch 2 x 2 N (two perturbed forwards)
Compute per micro-batch of T tokens: 6 N T FLOPs for forward + backward (2 N T for a forward; the hook
arithmetic x V^T adds about one forward of the trainable layers, 2 n T); attention is left out.
"""

from __future__ import annotations

import argparse

SHAPES = {  # Qwen2.5 configs: vocab, hidden, layers, intermediate, attention heads, key/value heads
    "7B": (152064, 3584, 28, 18944, 28, 4),
    "72B": (152064, 8192, 80, 29568, 64, 8),
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def counts(shape, lora_r: int) -> dict:
    vocab, h, layers, inter, heads, kv = shape
    kvd = h // heads * kv
    lin = {"q": (h, h), "k": (h, kvd), "v": (h, kvd), "o": (h, h), "gate": (h, inter), "up": (h, inter),
           "down": (inter, h)}
    per_layer = sum(i * o for i, o in lin.values()) + h + 2 * kvd + 2 * h  # + q/k/v biases, two norms
    head = h * h + h + 2 * h + 2
    n_all = vocab * h + layers * per_layer + h + head
    lora = layers * sum(lora_r * (i + o) for t, (i, o) in lin.items() if t in LORA_TARGETS) + head
    return {"N": n_all, "full_largest": vocab * h, "lora": lora, "lora_largest": max(h * h, lora_r * inter, head)}


def rows(a):
    out = []
    for name, shape in SHAPES.items():
        c = counts(shape, a.lora_r)
        for mode in ("lora", "full"):
            n_all = c["N"]
            n = c["N"] if mode == "full" else c["lora"]
            largest = c["full_largest"] if mode == "full" else c["lora_largest"]
            for w in a.worlds:
                f = (w - 1) / w
                states = (16 * n_all if mode == "full" else 2 * n_all + 16 * n) / w
                meta_new = 4 * n / w + 4 * largest
                meta_old = 10 * n
                inner = f * (4 * n_all + 2 * n)
                v_pass = inner
                exact = v_pass + f * (4 * n_all + 4 * n)
                fused = v_pass + f * 4 * n
                fd = v_pass + f * 4 * n_all
                bw = a.bw_intra if w <= a.gpus_per_node else a.bw_inter
                compute = 6 * n_all * a.tokens / a.flops
                out.append({"model": name, "mode": mode, "W": w, "N": n_all, "n": n, "states_gb": states / 1e9,
                            "meta_old_gb": meta_old / 1e9, "meta_new_gb": meta_new / 1e9, "inner_gb": inner / 1e9,
                            "exact_gb": exact / 1e9, "fused_gb": fused / 1e9, "fd_gb": fd / 1e9,
                            "compute_ms": 1e3 * compute, "inner_comm_ms": 1e3 * inner / bw,
                            "fused_comm_ms": 1e3 * fused / bw, "exact_comm_ms": 1e3 * exact / bw})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--worlds", nargs="+", type=int, default=[8, 32, 256], help="GPUs (ZeRO-3 over all of them)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank on q/k/v/o/gate/up/down")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (micro-batch 1)")
    p.add_argument("--flops", type=float, default=400e12, help="sustained bf16 FLOP/s per GPU")
    p.add_argument("--bw_intra", type=float, default=300e9, help="collective bandwidth per GPU inside a node, B/s")
    p.add_argument("--bw_inter", type=float, default=50e9, help="collective bandwidth per GPU across nodes, B/s")
    p.add_argument("--gpus_per_node", type=int, default=8)
    a = p.parse_args(argv)
    print(f"ZeRO-3, micro-batch 1 of {a.tokens} tokens, {a.flops / 1e12:.0f} TFLOP/s, {a.bw_intra / 1e9:.0f} GB/s "
          f"inside a node / {a.bw_inter / 1e9:.0f} GB/s across ({a.gpus_per_node} GPUs per node); GB per rank\n")
    print("| model | train | N / n | GPUs | model states | meta extra, before | meta extra, now | "
          "inner comm | + meta exact | + meta fused | + meta finite_diff | compute ms | inner comm ms | "
          "+ fused comm ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows(a):
        print(f"| {r['model']} | {r['mode']} | {r['N'] / 1e9:.2f}B / {r['n'] / 1e6:.0f}M | {r['W']} | "
              f"{r['states_gb']:.2f} | {r['meta_old_gb']:.2f} | {r['meta_new_gb']:.2f} | {r['inner_gb']:.1f} | "
              f"{r['exact_gb']:.1f} | {r['fused_gb']:.1f} | {r['fd_gb']:.1f} | {r['compute_ms']:.0f} | "
              f"{r['inner_comm_ms']:.0f} | {r['fused_comm_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
