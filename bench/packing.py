"""Padding waste and tokens/s of padded vs packed batches on the real PRM length distributions (issue 6).

    python bench/packing.py                      # MiniF2F prover attempts + ProcessBench, tiny tokenizer, CPU
    python bench/packing.py --timing_batches 0   # padding statistics only (seconds)

Data: ../shared/realdata/minif2f_prover_attempts_passfail/*_attempts.jsonl (format minif2f_attempts,
invalid records skipped) and ../shared/realdata/processbench/*.json (format processbench), tokenized with
dreamprm.tiny.make_tiny_tokenizer (a byte-level BPE trained on a few sentences: it needs about 2-3x more
tokens than Qwen's tokenizer for the same text, so lengths here are longer than in a real run) in the
chat template, cut at --max_length like training does.

Padding statistics: the examples in a fixed random order (like BatchStream), consecutive batches of B.
  waste = 1 - real tokens / token slots of the [rows, width] tensors the model runs on
  padded: collate() (B rows, width = longest example);
  packed: data.packing.collate_packed (rows of at most the longest example, first-fit decreasing) - the
          sdpa/eager layout; the one-row varlen layout for flash-attn has no padding at all;
  attn x need: query-key pairs a dense kernel computes over the sum(len^2) that per-example attention needs;
  7B FLOPs: what the padding and attention layouts cost a Qwen2.5-7B LoRA step (flops_7b), padded over
  packed rows and over one-row varlen - the speed-up to expect on a GPU where matmuls dominate.

Tokens/s: a random LoRA PRM (--hidden, --layers, fp32, sdpa) runs forward + backward (loss = sum of the
step logits) on the first --timing_batches batches of each data set, padded and packed alternately; real
tokens per second of each, and the largest difference of the per-example logits between the two (a check).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dreamprm.config import ModelConfig
from dreamprm.data.loader import collate
from dreamprm.data.packing import check_attention, collate_packed, padding_stats
from dreamprm.data.readers import load_records
from dreamprm.data.tokenize import encode_records
from dreamprm.model import build_prm
from dreamprm.tiny import STEP_TAG, make_tiny_checkpoint, make_tiny_tokenizer

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DATASETS = {
    "minif2f_attempts": ("minif2f_prover_attempts_passfail/*_attempts.jsonl", "minif2f_attempts"),
    "processbench": ("processbench/*.json", "processbench"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--realdata", default=str(REALDATA), help="folder holding the data sets")
    p.add_argument("--max_length", type=int, default=4096, help="tokens per example for the statistics")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8, 16], help="batch sizes for the statistics")
    p.add_argument("--timing_batches", type=int, default=4, help="batches per data set timed (0 = no timing)")
    p.add_argument("--timing_batch_size", type=int, default=8)
    p.add_argument("--timing_max_length", type=int, default=1024,
                   help="max_length for the timed batches (kept short so the CPU run takes minutes)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's default); 1 suits a CPU shared with other jobs")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(root: Path, name: str):
    pattern, fmt = DATASETS[name]
    files = sorted(glob.glob(str(root / pattern)))
    if not files:
        raise SystemExit(f"no files match {root / pattern}; pass --realdata DIR")
    return [r for f in files for r in load_records(f, fmt, skip_invalid=True)]


def flops_7b(st: dict, n=6.53e9, layers=28, hidden=3584) -> tuple[float, float, float]:
    """LoRA-step FLOPs of a Qwen2.5-7B PRM over these batches with sdpa, padded and packed in rows (a
    padding or packing mask rules out the causal skip: the dense kernel computes every S x S pair), and
    with flash-attn varlen in one row (causal pairs of each example only).
    Linear layers 4 N per token slot; attention 12 h L per query-key pair (forward 4 h, backward 8 h)."""
    lin, att = 4 * n, 12 * hidden * layers
    return (lin * st["slots_padded"] + att * st["pairs_padded"],
            lin * st["slots_packed"] + att * st["pairs_packed"],
            lin * st["tokens"] + att * st["pairs_need"] / 2)


def order(n: int, seed: int) -> list[int]:
    return np.random.default_rng([seed, 0]).permutation(n).tolist()


def fwd_bwd(prm, b) -> tuple[float, torch.Tensor]:
    params = [p for p in prm.parameters() if p.requires_grad]
    t = time.perf_counter()
    logits = prm(b["input_ids"], b["attention_mask"], b["tag_pos"], b.get("position_ids"))
    loss = (logits * b["step_mask"][..., None]).sum()
    torch.autograd.grad(loss, params)
    return time.perf_counter() - t, logits.detach()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = make_tiny_tokenizer()
    root = Path(a.realdata)
    print(f"padding waste: tiny tokenizer, max_length {a.max_length}, random order (seed {a.seed})\n")
    print("| data | examples | mean tokens | batch | waste padded | waste packed | rows/batch "
          "| attn padded x need | attn packed x need | 7B FLOPs padded / packed | padded / varlen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    data, notes = {}, []
    for name in DATASETS:
        data[name] = load(root, name)
        exs, st = encode_records(data[name], tok, STEP_TAG, a.max_length, use_chat_template=True)
        lens = [len(exs[i].input_ids) for i in order(len(exs), a.seed)]
        for bs in a.batch_sizes:
            s = padding_stats(lens, bs)
            f_pad, f_rows, f_var = flops_7b(s)
            print(f"| {name} | {len(exs)} | {statistics.mean(lens):.0f} | {bs} | {s['waste_padded']:.1%} "
                  f"| {s['waste_packed']:.1%} | {s['rows_per_batch']:.2f} | {s['attn_padded_over_need']:.2f} "
                  f"| {s['attn_packed_over_need']:.2f} | {f_pad / f_rows:.2f}x | {f_pad / f_var:.2f}x |")
        notes.append(f"{name}: {st.n_kept}/{st.n_records} examples kept, {st.n_truncated} truncated at a step "
                     f"boundary, {st.n_dropped} dropped (first step longer than max_length), untruncated max "
                     f"{st.full_len_max} tokens")
    print("\n" + "\n".join(notes) + "\npacked: rows of at most the longest example of the batch (sdpa/eager); the "
          "one-row varlen layout (flash-attn) has 0% waste and attn x need 1.00 by construction")
    if a.timing_batches <= 0:
        return 0

    check_attention(a.attn_implementation)
    with tempfile.TemporaryDirectory(prefix="dreamprm-packing-") as tmp:
        make_tiny_checkpoint(tmp, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=max(1, a.heads // 2),
                             intermediate=round(a.hidden * 5.29 / 64) * 64)
        torch.manual_seed(a.seed)
        prm, tk = build_prm(ModelConfig(name_or_path=tmp, mode="lora", lora_dropout=0.0,
                                        attn_implementation=a.attn_implementation), "fp32")
        prm.eval()  # no dropout, so padded and packed logits can be compared
    pad = tk.pad_token_id
    print(f"\ntokens/s: forward+backward of a random LoRA PRM (hidden {a.hidden}, {a.layers} layers, fp32, "
          f"{a.attn_implementation}, {torch.get_num_threads()} threads), batch {a.timing_batch_size}, max_length "
          f"{a.timing_max_length}, first {a.timing_batches} batches of each data set\n")
    print("| data | real tokens | slots padded | slots packed | padded tokens/s | packed tokens/s | speed-up "
          "| max logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, records in data.items():
        exs, _ = encode_records(records, tok, STEP_TAG, a.timing_max_length, use_chat_template=True)
        ix = order(len(exs), a.seed + 1)
        batches = [[exs[i] for i in ix[j * a.timing_batch_size:(j + 1) * a.timing_batch_size]]
                   for j in range(a.timing_batches)]
        fwd_bwd(prm, collate(batches[0][:2], pad))  # warm-up
        fwd_bwd(prm, collate_packed(batches[0][:2], pad))
        t_pad = t_pack = 0.0
        real = slots_pad = slots_pack = 0
        diff = 0.0
        for bt in batches:
            u, p = collate(bt, pad), collate_packed(bt, pad)
            dt_u, lu = fwd_bwd(prm, u)
            dt_p, lp = fwd_bwd(prm, p)
            t_pad, t_pack = t_pad + dt_u, t_pack + dt_p
            real += u["n_tokens"]
            slots_pad += u["input_ids"].numel()
            slots_pack += p["input_ids"].numel()
            m = u["step_mask"]
            diff = max(diff, (lu[m] - lp[m]).abs().max().item())
        print(f"| {name} | {real} | {slots_pad} | {slots_pack} | {real / t_pad:.0f} | {real / t_pack:.0f} "
              f"| {t_pad / t_pack:.2f}x | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
