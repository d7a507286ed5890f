"""--packing in training: 2 ranks, ZeRO-3, 5 bilevel updates packed vs padded (tests/packing_worker.py).

Tolerance: fp32 on CPU. The two layouts run the same math on differently shaped tensors (rows of
several examples with a block-diagonal mask vs one padded row each), so sums are reduced in another
order: per-logit differences are ~1e-7. Five Adam updates at lr 1e-3 carry that into parameters at
the same scale (Adam's step is lr * m / sqrt(v), insensitive to tiny relative changes of the
gradient, except where a gradient is ~0), and the instance weights move by meta_lr * a tiny change
of the alignment. Measured here (the test prints it): losses 1.2e-7, weights 0, parameters 5.5e-7.
atol 2e-5 on losses and weights, 1e-5 on parameters leaves ~20-100x room and stays far below what a
mask leak between packed neighbours does (losses change at 1e-2: tests/data/test_packing.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
FLAGS = ["--deepspeed", "ds_configs/zero3.json", "--precision", "fp32", "--mode", "lora", "--lora_dropout", "0",
         "--batch_size", "6", "--meta_batch_size", "3", "--total_steps", "5", "--lr", "1e-3", "--meta_lr", "0.5",
         "--weights", "instance_table",
         "--attn_implementation", "sdpa", "--disable_wandb"]


def run_worker(out: Path, packing: bool):
    out.mkdir()
    cmd = [*TORCHRUN, "tests/packing_worker.py", str(out), *FLAGS, "--packing" if packing else "--no-packing",
           "--output_dir", str(out / "run")]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, torch.load(out / "final.pt", weights_only=False)


def test_packed_equals_padded_over_five_zero3_updates(tmp_path):
    (pad_ranks, pad_final), (pack_ranks, pack_final) = (run_worker(tmp_path / k, k == "packed")
                                                        for k in ("padded", "packed"))
    assert all(all(r["packed"]) for r in pack_ranks) and not any(any(r["packed"]) for r in pad_ranks)
    drift = {k: max(abs(a[k][i] - b[k][i]) for a, b in zip(pad_ranks, pack_ranks) for i in a[k])
             for k in ("losses", "weights")}
    drift["params"] = max((pack_final["params"][n] - p).abs().max().item() for n, p in pad_final["params"].items())
    print("packed vs padded, max |difference| over 5 updates:", drift)  # pytest -s shows it
    for a, b in zip(pad_ranks, pack_ranks):
        assert a["losses"].keys() == b["losses"].keys() and len(a["losses"]) == 5 * 6
        for k in a["losses"]:
            assert abs(a["losses"][k] - b["losses"][k]) < 2e-5, k
            assert abs(a["weights"][k] - b["weights"][k]) < 2e-5, k
        torch.testing.assert_close(torch.tensor(b["meta_loss"]), torch.tensor(a["meta_loss"]), atol=2e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(b["align_mean"]), torch.tensor(a["align_mean"]), atol=1e-4,
                                   rtol=1e-3)
    # the weights moved (the comparison is not of untouched values) and agree
    assert (pad_final["table"] - 1).abs().max() > 1e-3
    torch.testing.assert_close(pack_final["table"], pad_final["table"], atol=2e-5, rtol=0)
    assert pad_final["params"].keys() == pack_final["params"].keys()
    for n, p in pad_final["params"].items():
        torch.testing.assert_close(pack_final["params"][n], p, atol=1e-5, rtol=0, msg=n)
