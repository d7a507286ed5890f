"""Training tokens/s with --packing vs without, through the real training loop, on real length mixes.

    python bench/packing_train.py                  # ProcessBench + MiniF2F attempts, CPU, ~10 minutes
    python bench/packing_train.py --tokenizer ~/.cache/dreamprm/smollm2-135m-instruct --max_length 2048

For each data set, `launch/train.py` runs twice on the same records, the same batches and the same
model (a random tiny LoRA PRM: hidden 256, 2 layers, fp32, sdpa, 1 thread), once padded and once with
--packing, the bilevel loop on (finite differences, meta batch = the same data). metrics.jsonl logs
tokens/s of every update (real training tokens over the wall time of the update and its meta pass);
the first update is left out (warm-up) and the median of the rest is reported.

Data (../shared/realdata): ProcessBench (4 splits, first-error step labels) and MiniF2F prover attempts
(3 provers; their steps get the attempt's pass/fail as a label: this bench measures speed only),
--records of each drawn at random, tokenized with the tiny tokenizer in the chat template and cut at
--max_length like training does.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from dreamprm.data.readers import load_records
from dreamprm.data.record import write_jsonl
from dreamprm.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
DATASETS = {"processbench": ("processbench/*.json", "processbench"),
            "minif2f_attempts": ("minif2f_prover_attempts_passfail/*_attempts.jsonl", "minif2f_attempts")}


def records(root: Path, name: str, n: int, seed: int):
    pattern, fmt = DATASETS[name]
    files = sorted(glob.glob(str(root / pattern)))
    if not files:
        raise SystemExit(f"no files match {root / pattern}; pass --realdata DIR")
    recs = [r for f in files for r in load_records(f, fmt, skip_invalid=True)]
    recs = random.Random(seed).sample(recs, min(n, len(recs)))
    if name == "minif2f_attempts":  # outcome as every step's label (speed only)
        recs = [replace(r, labels=[r.outcome] * len(r.steps)) for r in recs]
    return recs


def tiny_model(out: Path, tokenizer: str | None) -> Path:
    """The random tiny LoRA PRM backbone (hidden 256, 2 layers); with --tokenizer, over that tokenizer
    (e.g. SmolLM2's, whose token counts are what a real run sees) instead of dreamprm's tiny one."""
    if tokenizer is None:
        return make_tiny_checkpoint(out, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1344)
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=1344, max_position_embeddings=8192,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(model: Path, data: Path, out: Path, a, packing: bool) -> list[dict]:
    cmd = [sys.executable, "launch/train.py", "--model_name", str(model), "--train_file", str(data),
           "--meta_file", str(data), "--mode", "lora", "--precision", "fp32", "--attn_implementation", "sdpa",
           "--max_length", str(a.max_length), "--batch_size", str(a.batch_size), "--meta_batch_size",
           str(a.batch_size), "--total_steps", str(a.updates + 1), "--log_every", "1", "--save_every", "100000",
           "--disable_wandb", "--output_dir", str(out), "--packing" if packing else "--no-packing"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "WANDB_MODE": "disabled"}  # runs the installed dreamprm
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default=str(REALDATA))
    p.add_argument("--records", type=int, default=96, help="records drawn from each data set")
    p.add_argument("--updates", type=int, default=6, help="timed updates per run (after one warm-up update)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", metavar="DIR", help="tokenize with this folder's tokenizer (e.g. the SmolLM2 "
                   "folder of `dreamprm smollm2`) instead of the tiny one")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"tiny LoRA PRM (hidden 256, 2 layers), tokenizer {a.tokenizer or 'tiny'}, fp32, sdpa, {a.threads} "
          f"thread(s), batch {a.batch_size}, max_length {a.max_length}, {a.records} records per data set\n")
    print("| data | layout | timed updates | tokens/s (median) | packed / padded |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="dreamprm-packtrain-") as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "model", a.tokenizer)
        for name in DATASETS:
            data = tmp / f"{name}.jsonl"
            write_jsonl(records(Path(a.realdata), name, a.records, a.seed), data)
            speed = {}
            for packing in (False, True):
                rows = run(model, data, tmp / f"{name}-{packing}", a, packing)[1:]  # first update: warm-up
                speed[packing] = statistics.median(r["tokens_per_s"] for r in rows)
                ratio = f"{speed[True] / speed[False]:.2f}x" if packing else ""
                print(f"| {name} | {'packed' if packing else 'padded'} | {len(rows)} | {speed[packing]:.0f} "
                      f"| {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
