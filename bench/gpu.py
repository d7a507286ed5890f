"""A 7B PRM on one GPU: LoRA inner step, bilevel steps, QLoRA memory (issue 6).

    python bench/gpu.py                                   # every run below (about 15 minutes on one H100)
    python bench/gpu.py --runs lora --seq_lens 2048       # a subset: each run is its own process, so a
    python bench/gpu.py --runs qlora                      #   long sweep can be split over several calls
    python bench/gpu.py --json gpu.json                   # also keep the figures
    python bench/gpu.py --smoke_cpu                       # the same code paths on a tiny model on CPU (no figures)

Model: the Qwen2.5-7B architecture (QWEN25_7B below: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944,
vocab 152064, rope theta 1e6) with random weights created directly on the GPU in bf16 (nothing is downloaded
or written to disk), as a dreamprm PRM (backbone without LM head + score head) with LoRA r=16 on all seven
linear kinds (adapters and head fp32), through dreamprm.engine.create_engine: DeepSpeed ZeRO stage 0, bf16,
one rank, torch AdamW. The engine is unchanged; only its model builder is swapped for the random one.

Runs (each in a subprocess; an out-of-memory run is reported as such and the others go on):
  lora   for each --seq_lens (2048, 4096), --attn (sdpa, and flash_attention_2 when flash_attn imports) and
         gradient checkpointing off / on: bench/step_cost.py's measurement - the plain LoRA inner step, the
         bilevel step (finite_diff and exact at meta_interval 1 and 5), forward, forward+backward, meta
         forward+backward, per-instance forward+backward, the analytic floors - batch 1, meta batch 1.
  qlora  4-bit NF4 base with double quantisation (bitsandbytes Linear4bit, as --mode qlora loads it),
         LoRA on top, sdpa, checkpointing off / on, each --seq_lens: the plain inner step and the finite_diff
         bilevel step at meta_interval 5 - peak memory and tokens/s.

FLOP count behind MFU (per step; T tokens in the step, S sequence length, L layers, h hidden size):
  N       weights of the backbone's linear layers (embeddings are a lookup; the score head runs on the step
          tags only) = 6.53e9 for Qwen2.5-7B;
  N_lora  LoRA adapter weights (about 40e6 at r=16);
  attention, causal half counted: forward 2 L S h per token, backward twice that;
  LoRA / QLoRA training step   F = T (4 N + 6 N_lora + 6 L S h)   (forward 2N, input-gradient backward 2N,
                                     no weight-gradient matmuls of frozen weights)
  full fine-tuning step        F = T (6 N + 6 L S h)
  forward                      F = T (2 N + 2 L S h)
  MFU = F / step time / peak. Recomputation under gradient checkpointing is not counted (MFU, not HFU).
  Bilevel rows count only their inner step's F, so their MFU shows what the meta pass costs in throughput.
  Peak (dense bf16): --peak_tflops, else by device name: H100 SXM / H200 989.4, H100 PCIe / NVL 756, A100 312.
Targets (issue 6, one H100): LoRA inner step >= 40% MFU; bilevel at meta_interval 5 >= 0.8x plain tokens/s;
QLoRA 7B at 4096 tokens <= 12 GB peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from dreamprm import engine
from dreamprm import model as prm_model
from dreamprm.tiny import make_tiny_tokenizer

from dreamprm.hypergrad import StepLoss

def _bench_module(name: str):
    """bench/ is not a package: load a sibling script by its file path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before it runs: dataclasses and pickling look their module up by name
    spec.loader.exec_module(mod)
    return mod


step_cost = _bench_module("step_cost")  # bench/step_cost.py: the measurement itself

# Qwen2.5-7B's config.json (the values that shape compute and memory)
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=131072,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False,
                 max_window_layers=28, attention_dropout=0.0, initializer_range=0.02)
# --smoke_cpu: the same shapes' kinds, tiny
TINY = dict(QWEN25_7B, vocab_size=640, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 756.0), ("H100", 989.4), ("A100", 312.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--runs", nargs="+", choices=("lora", "qlora"), default=["lora", "qlora"], help="which runs")
    p.add_argument("--seq_lens", nargs="+", type=int, default=[2048, 4096], help="tokens per example")
    p.add_argument("--attn", nargs="+", choices=("sdpa", "flash_attention_2"), default=None,
                   help="attention kernels for the lora runs (default: sdpa, plus flash_attention_2 if importable)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                   help="gradient checkpointing settings")
    p.add_argument("--methods", nargs="+", choices=step_cost.METHODS, default=list(step_cost.METHODS),
                   help="hypergradient methods of the lora runs")
    p.add_argument("--batch_size", type=int, default=1, help="examples per step")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak of the GPU; 0 = by name")
    p.add_argument("--json", default="", help="write every run's figures to this file")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run before it is stopped")
    p.add_argument("--smoke_cpu", action="store_true",
                   help="run the code paths on a tiny Qwen2 on CPU (checks the script; its figures mean nothing)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: a single run, as JSON
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model


def qwen2_config(arch: dict, attn: str):
    from transformers import Qwen2Config

    kw = dict(arch)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw["rope_theta"]}  # transformers 5 reads this
    return Qwen2Config(**kw, attn_implementation=attn)


@torch.no_grad()
def init_random_(model: nn.Module, std: float) -> None:
    """Deterministic random weights (memory from torch.empty may hold anything, NaN included)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.normal_(0.0, std)


def quantize_linears_(model: nn.Module, compute_dtype: torch.dtype, device) -> None:
    """Every nn.Linear -> bitsandbytes Linear4bit, NF4 with double quantisation (what --mode qlora loads)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child
    model.is_loaded_in_4bit = True  # peft reads it to put its 4-bit LoRA layers in


def build_random_prm(arch: dict, mcfg, precision: str, device):
    """Like dreamprm.model.build_prm, but the backbone is a random Qwen2 built in place on `device`."""
    from transformers import Qwen2Model

    dtype = prm_model.DTYPES[precision]
    cfg = qwen2_config(arch, prm_model.resolve_attn(mcfg.attn_implementation))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            backbone = Qwen2Model(cfg)
    finally:
        torch.set_default_dtype(default)
    init_random_(backbone, arch["initializer_range"])
    if mcfg.mode == "qlora":
        quantize_linears_(backbone, dtype, device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    prm = prm_model.PRM(backbone, arch["hidden_size"])
    prm.score.to(device)
    prm = prm_model.prepare_for_training(prm, mcfg)
    return prm, make_tiny_tokenizer()  # the tokenizer only supplies the pad and tag ids


# ---------------------------------------------------------------- FLOPs


def matmul_params(prm) -> tuple[int, int]:
    """(N, N_lora): weights of the linear layers every token goes through (embeddings and the score head,
    which runs on the step tags only, excluded), and the LoRA adapters' share of them."""
    n = n_lora = 0
    for name, mod in prm.model.named_modules():
        if isinstance(mod, nn.Linear):  # bitsandbytes' Linear4bit is one too; peft's wrappers are not
            if "lora_" in name:
                n_lora += mod.in_features * mod.out_features
            else:
                n += mod.in_features * mod.out_features
    return n, n_lora


def flops_per_token(kind: str, n: int, n_lora: int, arch: dict, seq: int) -> float:
    attn_fwd = 2 * arch["num_hidden_layers"] * seq * arch["hidden_size"]
    if kind == "forward":
        return 2 * n + attn_fwd
    if kind == "full":
        return 6 * n + 3 * attn_fwd
    return 4 * n + 6 * n_lora + 3 * attn_fwd  # lora / qlora


def peak_tflops(a) -> float:
    if a.peak_tflops:
        return a.peak_tflops
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS if k in name), 0.0)


# ---------------------------------------------------------------- one run (in its own process)


def one_run(spec: dict) -> dict:
    arch = TINY if spec["smoke_cpu"] else QWEN25_7B
    device = "cpu" if spec["smoke_cpu"] else f"cuda:{torch.cuda.current_device()}"
    a = step_cost.parse_args([
        "--hidden", str(arch["hidden_size"]), "--layers", str(arch["num_hidden_layers"]),
        "--heads", str(arch["num_attention_heads"]), "--kv_heads", str(arch["num_key_value_heads"]),
        "--intermediate", str(arch["intermediate_size"]),  # the table's header (the model is built here)
        "--seq_len", str(spec["seq_len"]), "--batch_size", str(spec["batch_size"]), "--meta_batch_size", "1",
        "--mode", spec["mode"], "--lora_r", str(spec["lora_r"]), "--precision", "bf16",
        "--attn_implementation", spec["attn"], "--repeats", str(spec["repeats"]), "--warmup", str(spec["warmup"]),
        "--methods", *spec["methods"], "--intervals", *map(str, spec["intervals"]),
        *(["--gradient_checkpointing"] if spec["checkpointing"] else [])])
    rank, world = engine.init_distributed()
    torch.manual_seed(a.seed)
    cfg = step_cost.run_config(a)
    prm, tok = build_random_prm(arch, cfg.model, cfg.train.precision, device)
    eng = engine.create_engine(cfg, rank, world, StepLoss(), tokenizer=tok, model=prm)
    n, n_lora = matmul_params(eng.module)
    result = step_cost.measure(a, cfg, eng, rank, world)
    kind = "full" if spec["mode"] == "full" else "lora"
    for row in result["rows"]:
        name = row["config"]
        per_tok = flops_per_token("forward" if name == "fwd" else kind, n, n_lora, arch, spec["seq_len"])
        tokens = spec["seq_len"] * (1 if name == "meta fwd+bwd" else spec["batch_size"])  # meta batch 1
        row["tflop_per_step"] = per_tok * tokens / 1e12  # bilevel rows: the inner step's only
        row["tflops"] = row["tflop_per_step"] / (row["ms"] / 1e3)
    result["spec"], result["N"], result["N_lora"] = spec, n, n_lora
    return result


# ---------------------------------------------------------------- the sweep


def sweep_specs(a) -> list[dict]:
    attn = a.attn or (["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []))
    base = {"batch_size": a.batch_size, "lora_r": a.lora_r, "repeats": a.repeats, "warmup": a.warmup,
            "smoke_cpu": a.smoke_cpu}
    seqs = [64] if a.smoke_cpu else a.seq_lens
    specs = []
    if "lora" in a.runs:
        specs += [dict(base, run="lora", mode="lora", seq_len=s, attn=at, checkpointing=c == "on",
                       methods=list(a.methods), intervals=[1, 5])
                  for s in seqs for at in attn for c in a.checkpointing]
    if "qlora" in a.runs:
        specs += [dict(base, run="qlora", mode="qlora", seq_len=s, attn="sdpa", checkpointing=c == "on",
                       methods=["finite_diff"], intervals=[5])
                  for s in seqs for c in a.checkpointing]
    return specs


def launch(spec: dict, timeout: int) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    err = p.stderr.strip().splitlines()
    oom = any("OutOfMemoryError" in x or "CUDA out of memory" in x for x in err)
    return {"spec": spec, "error": "out of memory" if oom else (err[-1] if err else f"exit {p.returncode}"),
            "stderr_tail": "\n".join(err[-30:])}


def gb(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def summary(results: list[dict], peak: float) -> str:
    """One line per run: the plain LoRA step, then each bilevel configuration against it."""
    lines = ["| run | tokens | attention | ckpt | plain tok/s | plain MFU | plain peak GB | bilevel | tok/s "
             "| tok/s x plain | x floor | peak GB |", "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        s = r["spec"]
        head = f"| {s['run']} | {s['seq_len']} | {s['attn']} | {'on' if s['checkpointing'] else 'off'} "
        if "error" in r:
            lines.append(head + f"| {r['error']} | | | | | | | |")
            continue
        p = next(x for x in r["rows"] if x["config"] == "plain")
        mfu = f"{p['tflops'] / peak:.1%}" if peak else "-"
        lead = head + f"| {p['tokens_per_s']:.0f} | {mfu} | {gb(p['peak_mb'])} "
        for x in (x for x in r["rows"] if " k=" in x["config"]):
            lines.append(lead + f"| {x['config']} | {x['tokens_per_s']:.0f} | {p['ms'] / x['ms']:.2f} "
                         f"| {x['x_floor']:.3f} | {gb(x['peak_mb'])} |")
            lead = "| | | | | | | "
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        res = one_run(json.loads(a.one))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if not torch.cuda.is_available() and not a.smoke_cpu:
        print("bench/gpu.py measures a 7B PRM and needs a CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Run it on a GPU machine with a CUDA build of torch; on this machine "
              "use bench/step_cost.py (CPU-sized step costs) and bench/packing.py, or --smoke_cpu to check this "
              "script's code paths on a tiny model.", file=sys.stderr)
        return 2
    peak = peak_tflops(a)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.smoke_cpu else "cpu (smoke)"
    print(f"device {device}; peak {peak or 'unknown (pass --peak_tflops)'} TFLOP/s dense bf16; torch "
          f"{torch.__version__}; flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}", flush=True)
    results = []
    for spec in sweep_specs(a):
        r = launch(spec, a.timeout)
        results.append(r)
        tag = f"{spec['run']} seq {spec['seq_len']} {spec['attn']} ckpt {'on' if spec['checkpointing'] else 'off'}"
        if "error" in r:
            print(f"\n## {tag}: {r['error']}\n{r.get('stderr_tail', '')[-2000:]}", flush=True)
            continue
        print(f"\n## {tag}: N = {r['N'] / 1e9:.2f}e9, N_lora = {r['N_lora'] / 1e6:.1f}e6\n", flush=True)
        print(step_cost.format_table(r), flush=True)
        if peak:
            print("\nMFU: " + ", ".join(f"{x['config']} {x['tflops'] / peak:.1%}" for x in r["rows"]), flush=True)
    print("\n## summary\n\n" + summary(results, peak), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"device": device, "peak_tflops": peak, "results": results}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    code = main()
    engine.close_distributed()
    sys.exit(code)
