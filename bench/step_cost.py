"""Cost of a bilevel step next to a plain step and next to its analytic floor (issue 6).

    python bench/step_cost.py                  # CPU defaults: hidden 512, 4 layers, 512 tokens, LoRA, ZeRO 0, 1 thread
    python bench/step_cost.py --deepspeed ds_configs/zero3.json --nproc 2   # 2 ranks (re-runs itself under torchrun)
    python bench/step_cost.py --memory --mode full --deepspeed ds_configs/zero3.json --worlds 1 2 4   # meta-pass memory
    torchrun --standalone --nproc_per_node 2 bench/step_cost.py --deepspeed ds_configs/zero3.json

A random Qwen2 of the chosen size is written by dreamprm.tiny.make_tiny_checkpoint to a temporary folder
and one engine (dreamprm.engine.create_engine) serves every configuration below. The configurations run
interleaved, one cycle of each per round, so load changes on a shared machine hit them all alike; each
figure is the median over rounds after the warm-up rounds (the max over ranks).

Configurations
  plain                    engine.inner_update with uniform weights (what --baseline trains)
  <method> k=<k>           k weighted engine.inner_update calls (instance table) + one bilevel.meta_update,
                           for method exact / finite_diff / fused (whose meta gradient runs before the k-th
                           update and whose alignments come from it) and meta interval k = 1, 5;
                           ms/step = cycle / k
  darts k=<k>              the same k updates + the meta pass of Betty's darts (what DreamPRM's public code
                           runs), written here on this engine (darts_meta_update below): v as above, then at
                           theta + eps v and theta - eps v a forward of the training batch WITH the autograd
                           graph and the gradient of the weighted loss w.r.t. the weight module, parameters
                           put back by adding eps v. Without Betty's own framework around it, so a lower
                           bound on Betty's cost (ZeRO 0-2 only)
  fwd, fwd+bwd             the training batch through the PRM module in eval mode: a no-grad forward, and a
                           forward + torch.autograd.grad w.r.t. the trainable parameters (as the meta pass does)
  meta fwd+bwd             the same forward + backward on the meta batch
  instance fwd+bwd         every training instance alone (a batch of one), forward + backward, summed
  (under ZeRO-3 each component starts from partitioned parameters - the gathered-parameter cache dropped,
  untimed - as the forwards of a meta pass do: they follow an optimizer step or a perturbation)

Analytic floor of a bilevel configuration with meta interval k:

    finite_diff:  F = P + (M_fb + 2 * T_f) / k
    darts:        F = P + (M_fb + 2 * T_f) / k   (its forwards keep the graph: not a floor it can reach)
    exact:        F = P + (M_fb + T_fb) / k
    fused:        F = P + M_fb / k

P = the plain step, M_fb = meta fwd+bwd, T_f = fwd, T_fb = fwd+bwd of the training batch (exact: one forward
and one activation backward per micro-batch, the per-sample hooks' arithmetic about one more forward of the
trainable layers; fused: the alignments come out of the update's own backward). `instance fwd+bwd` is what
exact cost before it used hooks (one backward per instance), kept for comparison. Everything else a meta
pass does (zeroing ZeRO's gradient buffers, cloning / perturbing / restoring parameters, dropping ZeRO-3's
gathered parameter cache, reducing v, the weight module's step) is overhead; "x floor" is the
measured step over F. "min ms" is the fastest round and "x floor (min)" the same ratio from the fastest
rounds: on a shared machine other processes only add time, so minima show the intrinsic cost when the
medians are noisy. The meta-pass breakdown below the table says where each configuration's time goes.

Peak memory: CUDA max_memory_allocated per configuration; on CPU the peak resident set size of the process
sampled every 2 ms while the configuration runs (allocator caching makes later rows inherit earlier peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dreamprm import bilevel, dist, engine, hypergrad, persample, preflight
from dreamprm.config import Config, validate
from dreamprm.data.loader import collate
from dreamprm.data.packing import select
from dreamprm.data.tokenize import Example
from dreamprm.tiny import STEP_TAG, make_tiny_checkpoint
from dreamprm.weights import build_weight_module, build_weight_optimizer

METHODS = ("exact", "finite_diff", "fused", "darts")
INTERVALS = (1, 5)
QWEN_FFN_RATIO = 18944 / 3584  # Qwen2.5-7B intermediate / hidden


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the random Qwen2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv_heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=0,
                   help="MLP width; 0 = hidden x 5.29 rounded to 64 (Qwen2.5-7B's ratio)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per example (every example has this length)")
    p.add_argument("--steps", type=int, default=8, help="step tags per example")
    p.add_argument("--batch_size", type=int, default=1, help="training examples per rank per update (the run "
                   "config's default; 1 keeps the default run within 10 minutes on a 2-core CPU)")
    p.add_argument("--meta_batch_size", type=int, default=1, help="meta examples per rank per meta pass")
    p.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora",
                   help="what trains (qlora: 4-bit base, needs --precision bf16 and bitsandbytes)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: bf16 with CUDA, fp32 on CPU (CPUs without AVX512-BF16 run bf16 slowly)")
    p.add_argument("--deepspeed", default="", help="DeepSpeed JSON (ds_configs/zero2.json, zero3.json); "
                   "empty = ZeRO stage 0")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fd_radius", type=float, default=0.01, help="finite differences: eps = fd_radius / ||v||")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="hypergradient methods")
    p.add_argument("--intervals", nargs="+", type=int, default=list(INTERVALS), help="meta intervals")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds first (a warm-up round runs every configuration but k > 1 once)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks; > 1 re-runs this script under torchrun (ignored when already launched)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per rank (0 = torch's default). 1 by default: on a CPU shared with other "
                   "jobs, more threads than free cores make every parallel op wait for a preempted worker (~1 ms "
                   "per op; 4x slower steps measured on the 2-core development machine)")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: the meta pass's extra peak memory per rank over a plain update, one "
                   "fresh process group per method and world size (--worlds), as a fraction of the trainable "
                   "parameters' fp32 bytes")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="--memory: world sizes")
    p.add_argument("--memory_method", default="", help=argparse.SUPPRESS)  # --memory: one run of one method
    p.add_argument("--json", default="", help="also write the figures to this JSON file (rank 0)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    problems = [f"--{k} must be >= 1" for k in ("hidden", "layers", "heads", "kv_heads", "seq_len", "steps",
                                                 "batch_size", "meta_batch_size", "repeats", "nproc")
                if getattr(a, k) < 1]
    if a.warmup < 0:
        problems.append("--warmup must be >= 0")
    if a.steps > a.seq_len // 2:
        problems.append(f"--steps {a.steps} needs --seq_len >= {2 * a.steps}")
    if any(k < 1 for k in a.intervals):
        problems.append("--intervals must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return a


def floor_ms(method: str, interval: int, plain: float, meta_fb: float, fwd: float, fwd_bwd: float) -> float:
    """The analytic floor of one bilevel step (see the module docstring)."""
    extra = meta_fb + {"finite_diff": 2 * fwd, "darts": 2 * fwd, "exact": fwd_bwd, "fused": 0.0}[method]
    return plain + extra / interval


# ---------------------------------------------------------------- data


def synthetic_examples(n: int, seq_len: int, steps: int, vocab: int, tag_id: int, pad_id: int, seed: int,
                       first_index: int = 0) -> list[Example]:
    """n examples of exactly seq_len tokens with `steps` tags spread evenly, the last at the end."""
    g = torch.Generator().manual_seed(seed)
    tag_pos = [(k + 1) * seq_len // steps - 1 for k in range(steps)]
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        ids[(ids == tag_id) | (ids == pad_id)] = 1
        ids[tag_pos] = tag_id
        labels = torch.randint(0, 2, (steps,), generator=g).float().tolist()
        out.append(Example(ids.tolist(), list(tag_pos), labels, float(i % 2), first_index + i, 0, steps, steps,
                           f"synthetic-{first_index + i}"))
    return out


class Cycle:
    """Endless iterator over a fixed list of batches (stands in for BatchStream)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


# ---------------------------------------------------------------- timing helpers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated, or process RSS sampled every 2 ms on CPU."""

    def __enter__(self):
        self.peak = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self.peak = rss_mb()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, rss_mb())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())


class MetaProfile:
    """Times the phases of bilevel.meta_update by wrapping its functions and the engine's forward (nothing else
    changes).

    Inclusive seconds per phase, summed over the meta passes of the active configuration.
    """

    def __init__(self, eng):
        self.eng, self.active, self.depth = eng, None, []
        self.acc: dict[str, dict[str, float]] = {}
        self.passes: dict[str, int] = {}
        self._saved: list = []
        self._wrap(bilevel, "meta_gradient", "v")
        self._wrap(bilevel, "fused_meta_gradient", "fused_v")
        self._wrap(bilevel, "fd_alignments", "align")
        self._wrap(bilevel, "exact_alignments", "align")
        self._wrap(sys.modules[__name__], "darts_alignments", "align")
        self._wrap(eng, "forward", "forward")  # inner updates run outside call(): not counted
        self._wrap(eng.ds.optimizer, "zero_grad", "zero_grad")
        if hasattr(eng.ds.optimizer, "empty_partition_cache"):
            self._wrap(eng.ds.optimizer, "empty_partition_cache", "cache_drop")
        self._wrap(eng.ds.module, "train", "mode_switch")

    def close(self) -> None:
        """Put the original functions back."""
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved = []

    def _wrap(self, owner, name, phase):
        fn = getattr(owner, name)
        self._saved.append((owner, name, fn))

        def timed(*args, **kw):
            if self.active is None:
                return fn(*args, **kw)
            key = f"{self.depth[-1]}.{phase}" if self.depth and phase == "forward" else phase
            self.depth.append(phase)
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                sync()
                d = self.acc.setdefault(self.active, {})
                d[key] = d.get(key, 0.0) + time.perf_counter() - t
                self.depth.pop()
        setattr(owner, name, timed)

    def call(self, label, fn, *args):
        """fn(*args) as part of the meta pass `label` (bilevel.meta_update ends a pass; fused mode's
        fused_meta_gradient before the update belongs to the same pass)."""
        self.active = label
        sync()
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            sync()
            d = self.acc.setdefault(label, {})
            d["total"] = d.get("total", 0.0) + time.perf_counter() - t
            if fn in (bilevel.meta_update, darts_meta_update):
                self.passes[label] = self.passes.get(label, 0) + 1
            self.active = None

    def breakdown(self, label) -> dict[str, float]:
        """ms per meta pass: total, and the exclusive time of each phase."""
        d, n = self.acc.get(label, {}), max(1, self.passes.get(label, 0))
        ms = {k: 1e3 * v / n for k, v in d.items()}
        out = {"total": ms.get("total", 0.0),
               "v: forward": ms.get("v.forward", 0.0),
               "v: backward + all-reduce": ms.get("v", 0.0) - ms.get("v.forward", 0.0),
               "alignments: forwards": ms.get("align.forward", 0.0),
               "alignments: rest": ms.get("align", 0.0) - ms.get("align.forward", 0.0) - ms.get("cache_drop", 0.0),
               "fused: v pass, rest": max(0.0, ms.get("fused_v", 0.0) - ms.get("v", 0.0) - ms.get("zero_grad", 0.0))
               if "fused_v" in ms else 0.0,
               "ZeRO-3 cache drops": ms.get("cache_drop", 0.0),
               "optimizer.zero_grad": ms.get("zero_grad", 0.0),
               "eval/train switches": ms.get("mode_switch", 0.0)}
        out["weight module + rest"] = out["total"] - sum(v for k, v in out.items() if k != "total")
        return out


# ---------------------------------------------------------------- the benchmark


def build(a: argparse.Namespace, rank: int, world: int):
    """Random Qwen2 checkpoint in a temporary folder (rank 0 writes it) and the engine on it."""
    tmp = None
    if rank == 0:
        tmp = tempfile.mkdtemp(prefix="dreamprm-bench-")
        inter = a.intermediate or max(64, round(a.hidden * QWEN_FFN_RATIO / 64) * 64)
        make_tiny_checkpoint(tmp, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                             intermediate=inter, seed=a.seed)
        cfg_json = json.loads((Path(tmp) / "config.json").read_text())
        cfg_json["max_position_embeddings"] = max(cfg_json["max_position_embeddings"], a.seq_len)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg_json, indent=2))
    tmp = dist.broadcast_object(tmp)
    cfg = run_config(a)
    cfg.model.name_or_path = tmp
    eng = engine.create_engine(cfg, rank, world, hypergrad.StepLoss())
    return cfg, eng, tmp


def run_config(a: argparse.Namespace) -> Config:
    """The run config the engine is built from (checked like a training run's)."""
    cfg = Config()
    cfg.model.mode, cfg.model.lora_r = a.mode, a.lora_r
    cfg.model.attn_implementation, cfg.model.gradient_checkpointing = a.attn_implementation, a.gradient_checkpointing
    cfg.train.batch_size, cfg.train.precision, cfg.train.deepspeed = a.batch_size, a.precision, a.deepspeed
    cfg.train.seed = a.seed
    cfg.meta.meta_batch_size, cfg.meta.fd_radius, cfg.meta.hypergrad = a.meta_batch_size, a.fd_radius, "exact"
    problems = validate(cfg) + preflight.path_problems(cfg)
    if problems:
        raise SystemExit("invalid settings: " + "; ".join(problems))
    return cfg


def make_batches(a: argparse.Namespace, eng, rank: int, world: int, n_batches: int = 3):
    """Synthetic training / meta batches of this rank (n_batches distinct ones, cycled), on the device."""
    tok = eng.tokenizer
    tag_id, pad_id = tok.convert_tokens_to_ids(STEP_TAG), tok.pad_token_id
    vocab = min(len(tok), eng.ds.module.model.get_input_embeddings().num_embeddings)
    n_train = n_batches * a.batch_size * world
    train = synthetic_examples(n_train, a.seq_len, a.steps, vocab, tag_id, pad_id, a.seed)
    meta = synthetic_examples(n_batches * a.meta_batch_size * world, a.seq_len, a.steps, vocab, tag_id, pad_id,
                              a.seed + 1)
    mine = train[rank::world]
    train_batches = [collate(mine[i * a.batch_size:(i + 1) * a.batch_size], pad_id) for i in range(n_batches)]
    mine = meta[rank::world]
    meta_batches = [collate(mine[i * a.meta_batch_size:(i + 1) * a.meta_batch_size], pad_id)
                    for i in range(n_batches)]
    dev = eng.ds.device
    return n_train, [engine.to_device(b, dev) for b in train_batches], [engine.to_device(b, dev) for b in meta_batches]


def darts_meta_update(eng, meta_batch: dict, recent: list, wmod, wopt, cfg: Config) -> None:
    """Betty's darts hypergradient on this engine, for timing (see the module docstring).

    The weight module's gradient is -(dL+/dlambda - dL-/dlambda) / (2 eps), L+- the weighted
    training loss of the last update's batches at theta +- eps v, eps = fd_radius / ||v||."""
    meta_batch = engine.to_device(meta_batch, eng.ds.device)
    lam = [p for p in wmod.parameters() if p.requires_grad]
    with persample.dropout_off(eng.ds.module):
        v, _ = bilevel.meta_gradient(eng, meta_batch, cfg.meta.aggregation, cfg.meta.meta_loss)
        eng.ds.optimizer.zero_grad()
        eps = hypergrad.fd_epsilon(cfg.meta.fd_radius, v.norm())
        grads = darts_alignments(eng, recent, v, eps, wmod, lam)
    wopt.zero_grad()
    for p, gp, gm in zip(lam, *grads):
        if gp is not None:
            p.grad = -(gp - gm) / (2 * eps)
    wopt.step()


def darts_alignments(eng, recent: list, v, eps: float, wmod, lam: list) -> list:
    """d(weighted training loss)/d lambda at theta + eps v and at theta - eps v; theta put back by adding eps v
    (Betty's restore, not bit-exact). The forwards keep the autograd graph, as in Betty."""
    local = [(p.data, v.local(p)) for p in eng.params]
    n = sum(len(r["batch"]["index"]) for r in recent)
    grads = []
    for move in (eps, -2 * eps):
        with torch.no_grad():
            for t, d in local:
                t.add_(d.to(t.dtype), alpha=move)
        loss = sum((wmod(r["batch"]["index"].cpu(), r["batch"]["domain"].cpu(), r["features"].cpu())
                    * hypergrad.instance_losses(eng.forward(r["batch"], meta=True), r["batch"]).cpu()
                    ).sum() for r in recent) / n
        grads.append(torch.autograd.grad(loss, lam, allow_unused=True))
    with torch.no_grad():
        for t, d in local:
            t.add_(d.to(t.dtype), alpha=eps)
    return grads


def grad_of(eng, loss) -> None:
    grads = torch.autograd.grad(loss, eng.params, allow_unused=True)
    del grads


def run(a: argparse.Namespace) -> dict:
    if a.precision is None:
        a.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world = engine.init_distributed()
    torch.manual_seed(a.seed)
    cfg, eng, tmp = build(a, rank, world)
    try:
        out = measure_memory(a, cfg, eng, rank, world) if a.memory_method else measure(a, cfg, eng, rank, world)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    engine.close_distributed()
    return out


def measure(a: argparse.Namespace, cfg: Config, eng, rank: int, world: int) -> dict:
    """Time every configuration on this engine (see the module docstring); the figures as a dict."""
    n_train, train_batches, meta_batches = make_batches(a, eng, rank, world)
    stream, meta_stream = Cycle(train_batches), Cycle(meta_batches)
    wmod = build_weight_module("instance_table", [0] * n_train, 1, cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta)
    prof = MetaProfile(eng)
    module = eng.ds.module
    methods = list(a.methods)
    if a.mode == "full" and a.precision == "bf16" and "finite_diff" in methods:
        methods.remove("finite_diff")  # the engine rejects it (perturbation lost to bf16 rounding)
        if rank == 0:
            print("note: finite_diff left out: full fine-tuning in bf16 is rejected by the config")
    if eng.stage == 3 and "darts" in methods:
        methods.remove("darts")  # it perturbs p.data, which ZeRO-3 does not hold
        if rank == 0:
            print("note: darts left out: it is timed with ZeRO 0-2 only")
    step = [0]

    def plain():
        step[0] += 1
        engine.inner_update(eng, stream, wmod, True, step[0])

    def bilevel_cycle(method, k):
        def f():
            cfg.meta.hypergrad = "finite_diff" if method == "darts" else method
            for i in range(k):
                step[0] += 1
                last = i == k - 1
                pre = prof.call(f"{method} k={k}", bilevel.fused_meta_gradient, eng, next(meta_stream), cfg) \
                    if last and method == "fused" else None
                out = engine.inner_update(eng, stream, wmod, False, step[0], tap=pre["tap"] if pre else None)
            if method == "darts":
                prof.call(f"{method} k={k}", darts_meta_update, eng, next(meta_stream), out["recent"], wmod, wopt,
                          cfg)
            else:
                prof.call(f"{method} k={k}", bilevel.meta_update, eng, None if pre else next(meta_stream),
                          out["recent"], wmod, wopt, cfg, step[0], pre)
        return f

    def fwd():
        with torch.no_grad():
            eng.forward(next(stream), meta=True)

    def fwd_bwd():
        b = next(stream)
        grad_of(eng, hypergrad.instance_losses(eng.forward(b, meta=True), b).mean())

    def meta_fwd_bwd():
        b = next(meta_stream)
        grad_of(eng, hypergrad.meta_loss(eng.forward(b, meta=True), b, cfg.meta.aggregation,
                                         cfg.meta.meta_loss))

    def inst_fwd_bwd():
        b = next(stream)
        for i in range(len(b["index"])):
            row = select(b, i)
            grad_of(eng, hypergrad.instance_losses(eng.forward(row, meta=True), row)[0])

    # (name, function, updates per cycle); components run in eval mode and exclude the zero_grad after them
    configs = [("plain", plain, 1), ("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 1), ("meta fwd+bwd", meta_fwd_bwd, 1),
               ("instance fwd+bwd", inst_fwd_bwd, 1)]
    configs += [(f"{m} k={k}", bilevel_cycle(m, k), k) for m in methods for k in a.intervals]
    components = {"fwd", "fwd+bwd", "meta fwd+bwd", "instance fwd+bwd"}
    times = {name: [] for name, _, _ in configs}
    peaks = dict.fromkeys(times, 0.0)
    for r in range(a.warmup + a.repeats):
        for name, fn, k in configs:
            if r < a.warmup and k > 1 and name.replace(f" k={k}", " k=1") in times:
                continue  # its code path is warmed up by the k=1 cycle of the same method
            dist.barrier()
            if name in components:
                was = module.training
                module.eval()
                if eng.stage == 3:  # start from partitioned parameters, as every forward of a meta pass does
                    eng.ds.optimizer.empty_partition_cache()
            with PeakMemory() as pm:
                sync()
                t = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t
            if name in components:
                eng.ds.optimizer.zero_grad()
                module.train(was)
            if r >= a.warmup:
                times[name].append(1e3 * dt / k)
                peaks[name] = max(peaks[name], pm.peak)
    names = [n for n, _, _ in configs]
    # synchronous steps: a configuration is as slow as its slowest rank
    vec = torch.tensor([statistics.median(times[n]) for n in names] + [min(times[n]) for n in names]
                       + [peaks[n] for n in names], dtype=torch.float64, device=eng.ds.device)
    vec = dist.all_reduce_(vec, op=torch.distributed.ReduceOp.MAX).cpu().tolist()  # NCCL: device tensors
    m = len(names)
    med, low, peaks = dict(zip(names, vec[:m])), dict(zip(names, vec[m:2 * m])), dict(zip(names, vec[2 * m:]))
    tokens = a.batch_size * a.seq_len * world  # per update, all ranks
    rows = []
    for name in names:
        row = {"config": name, "ms": med[name], "min_ms": low[name], "peak_mb": peaks[name],
               "spread_ms": [min(times[name]), max(times[name])]}
        if name not in components:
            row["tokens_per_s"] = tokens / (med[name] / 1e3)
            row["x_plain"] = med[name] / med["plain"]
        if " k=" in name:
            method, k = name.split(" k=")
            f = floor_ms(method, int(k), med["plain"], med["meta fwd+bwd"], med["fwd"], med["fwd+bwd"])
            f_low = floor_ms(method, int(k), low["plain"], low["meta fwd+bwd"], low["fwd"], low["fwd+bwd"])
            row.update(floor_ms=f, x_floor=med[name] / f, x_floor_min=low[name] / f_low)
            row["breakdown_ms"] = prof.breakdown(name)
        rows.append(row)
    result = {"settings": {**vars(a), "world": world, "stage": eng.stage,
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch_threads": torch.get_num_threads(), "tokens_per_update": tokens,
                           "trainable_params": sum(p.ds_numel if eng.stage == 3 else p.numel() for p in eng.params)},
              "rows": rows}
    prof.close()
    return result


def measure_memory(a: argparse.Namespace, cfg: Config, eng, rank: int, world: int) -> dict:
    """Peak over 2 plain updates, then over 2 bilevel cycles (k=1) of a.memory_method, after a warm-up
    cycle; max over ranks."""
    _, train_batches, meta_batches = make_batches(a, eng, rank, world)
    stream, meta_stream = Cycle(train_batches), Cycle(meta_batches)
    n_train = len(train_batches) * a.batch_size * world
    wmod = build_weight_module("instance_table", [0] * n_train, 1, cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta)
    cfg.meta.hypergrad = method = a.memory_method

    def cycle(s):
        pre = bilevel.fused_meta_gradient(eng, next(meta_stream), cfg) if method == "fused" else None
        out = engine.inner_update(eng, stream, wmod, False, s, tap=pre["tap"] if pre else None)
        bilevel.meta_update(eng, None if pre else next(meta_stream), out["recent"], wmod, wopt, cfg, s, pre)

    engine.inner_update(eng, stream, wmod, True, 0)  # optimizer state allocated
    dist.barrier()
    before = rss_mb()
    cycle(1)  # warm-up: whatever the first meta pass allocates and keeps counts as "kept", not as peak
    dist.barrier()
    kept = rss_mb() - before
    with PeakMemory() as plain:
        for s in (2, 3):
            engine.inner_update(eng, stream, wmod, True, s)
    dist.barrier()
    with PeakMemory() as meta:
        for s in (4, 5):
            cycle(s)
    vec = torch.tensor([plain.peak, meta.peak, meta.peak - plain.peak, kept], dtype=torch.float64,
                       device=eng.ds.device)
    vec = dist.all_reduce_(vec, op=torch.distributed.ReduceOp.MAX).cpu().tolist()
    n = sum(p.ds_numel if eng.stage == 3 else p.numel() for p in eng.params)
    return {"method": method, "world": world, "stage": eng.stage, "trainable_params": n,
            "plain_peak_mb": vec[0], "meta_peak_mb": vec[1], "extra_mb": vec[2],
            "extra_over_fp32_params": vec[2] * 2**20 / (4 * n), "kept_after_first_pass_mb": vec[3]}


def memory_runs(a: argparse.Namespace, argv: list[str]) -> list[dict]:
    """One torchrun per (world, method) with --memory_method; glibc's mmap threshold is pinned so freed
    tensors leave the resident set (a dynamic threshold keeps them, and later peaks would inherit earlier ones)."""
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for world in a.worlds:
        for method in [m for m in a.methods if m != "darts"]:  # darts is timed only (ZeRO 0-2)
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                       __file__, *argv, "--memory_method", method, "--json", f.name]
                subprocess.run(cmd, env=env, check=True)
                rows.append(json.loads(Path(f.name).read_text()))
    return rows


def format_memory(a: argparse.Namespace, rows: list[dict]) -> str:
    n = rows[0]["trainable_params"]
    lines = [f"meta-pass memory: hidden {a.hidden}, {a.layers} layers, {a.seq_len} tokens x batch {a.batch_size} "
             f"(meta batch {a.meta_batch_size}), {a.mode}, {a.precision}, {a.deepspeed or 'ZeRO stage 0'}, "
             f"{n / 1e6:.1f}M trainable parameters ({4 * n / 2**20:.0f} MB in fp32); peak RSS per rank (max over "
             "ranks), 2 plain updates vs 2 bilevel cycles (k=1), both after one warm-up cycle; kept: resident "
             "growth over that first cycle (what a first meta pass allocates and keeps)", "",
             "| world | method | plain peak MB | meta peak MB | extra MB | extra / fp32 params | 1.25 / world "
             "| kept MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['method']} | {r['plain_peak_mb']:.0f} | {r['meta_peak_mb']:.0f} | "
                     f"{r['extra_mb']:.0f} | {r['extra_over_fp32_params']:.3f} | {1.25 / r['world']:.3f} "
                     f"| {r['kept_after_first_pass_mb']:.0f} |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"step cost: hidden {s['hidden']}, {s['layers']} layers, {s['seq_len']} tokens x batch "
             f"{s['batch_size']} (meta batch {s['meta_batch_size']}), {s['mode']}, {s['precision']}, "
             f"ZeRO stage {s['stage']}, {s['world']} rank(s), {s['attn_implementation']}, device {s['device']}, "
             f"{s['torch_threads']} threads; median of {s['repeats']} after {s['warmup']} warm-up round(s)",
             "",
             f"| {'configuration':<18} | {'ms/step':>8} | {'min ms':>8} | {'tokens/s':>8} | {'peak MB':>8} "
             f"| {'x plain':>7} | {'floor ms':>8} | {'x floor':>7} | {'x floor (min)':>13} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, spec):
        return format(x, spec) if x is not None else "-"
    for r in result["rows"]:
        lines.append(f"| {r['config']:<18} | {r['ms']:8.1f} | {r['min_ms']:8.1f} | "
                     f"{f(r.get('tokens_per_s'), '8.0f'):>8} | {r['peak_mb']:8.0f} | {f(r.get('x_plain'), '7.2f'):>7} "
                     f"| {f(r.get('floor_ms'), '8.1f'):>8} | {f(r.get('x_floor'), '7.3f'):>7} "
                     f"| {f(r.get('x_floor_min'), '13.3f'):>13} |")
    lines += ["", "floor: finite_diff and darts P + (M_fb + 2 T_f) / k; exact P + (M_fb + T_fb) / k; "
              "fused P + M_fb / k (P plain, M_fb meta fwd+bwd, T_f fwd, T_fb fwd+bwd of the training batch); "
              "x floor (min): the same from the fastest round of every row (contention on a shared machine only "
              "adds time)"]
    bd = [r for r in result["rows"] if "breakdown_ms" in r]
    if bd:
        keys = list(bd[0]["breakdown_ms"])
        lines += ["", "meta pass breakdown (ms per meta pass)", "",
                  "| phase | " + " | ".join(r["config"] for r in bd) + " |",
                  "|---|" + "---:|" * len(bd)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{r['breakdown_ms'][k]:.1f}" for r in bd) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.memory and not a.memory_method:
        rest = [x for x in (sys.argv[1:] if argv is None else argv)]
        i = rest.index("--worlds") if "--worlds" in rest else -1
        if i >= 0:  # the per-run processes do not need --worlds
            j = i + 1
            while j < len(rest) and not rest[j].startswith("--"):
                j += 1
            del rest[i:j]
        rows = memory_runs(a, rest)
        print(format_memory(a, rows), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
        return 0
    if a.nproc > 1 and "RANK" not in os.environ:
        args, rest = [], list(sys.argv[1:] if argv is None else argv)
        while rest:  # --nproc stays here (torchrun's parser would take it for its own --nproc-per-node)
            x = rest.pop(0)
            if x == "--nproc":
                rest.pop(0)
            elif not x.startswith("--nproc="):
                args.append(x)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               __file__, *args]
        return subprocess.call(cmd)
    result = run(a)
    if int(os.environ.get("RANK", "0")) == 0:
        if not a.memory_method:
            print(format_table(result), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
