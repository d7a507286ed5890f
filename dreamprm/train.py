"""The training loop: plain functions around engine.inner_update and engine.meta_update.

    fit(cfg)
      init process group -> engine (PRM + DeepSpeed) -> data -> weight module
      -> resume (latest complete checkpoint) -> for each update:
           inner_update; every meta_interval updates meta_update;
           log metrics.jsonl / status.json / wandb; checkpoint every save_every;
           stop cleanly on SIGTERM / Ctrl+C (checkpoint first)
      -> final checkpoint, instance weights per id.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from dreamprm import engine, runlock
from dreamprm.config import Config, save_config
from dreamprm.data.loader import BatchStream, with_workers
from dreamprm.data.readers import load_records
from dreamprm.data.tokenize import domain_table, encode_records
from dreamprm.errors import DataError
from dreamprm.train_eval import eval_step_metrics, load_eval_examples
from dreamprm.weights import DomainTable, InstanceTable, build_weight_module, build_weight_optimizer

DEMO_DIR = Path(__file__).parent / "demo"
# Fields that must agree between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = [("data", "train_file"), ("data", "meta_file"), ("data", "max_length"),
                     ("model", "name_or_path"), ("model", "mode"), ("model", "lora_r"),
                     ("model", "step_tag"), ("meta", "weights"), ("meta", "baseline"),
                     ("train", "batch_size"), ("train", "grad_accum"), ("train", "seed")]


def print0(*args, rank: int = 0) -> None:
    if rank == 0:
        print(*args, flush=True)


# ---------------------------------------------------------------- data


def data_paths(cfg: Config) -> tuple[str, str, str, str]:
    """(train file, train format, meta file, meta format); empty paths mean the demo data."""
    d = cfg.data
    if d.train_file:
        return d.train_file, d.train_format, d.meta_file, d.meta_format
    return str(DEMO_DIR / "train.jsonl"), "minif2f", str(DEMO_DIR / "meta.jsonl"), "minif2f"


def load_data(cfg: Config, tokenizer, rank: int, needs_meta: bool, world: int = 1):
    """Read, validate and tokenize train / meta / eval data; every count is printed."""
    train_path, train_fmt, meta_path, meta_fmt = data_paths(cfg)
    tag, skip = cfg.model.step_tag, cfg.data.skip_invalid
    train = load_records(train_path, train_fmt, step_tag=tag, skip_invalid=skip)
    unlabelled = [r.id for r in train if all(y is None for y in r.labels)]
    if unlabelled:
        raise DataError([(f"--train_file {train_path}: {len(unlabelled)} records have no step labels "
                         f"(e.g. {unlabelled[:3]}); training needs step labels (use them as --meta_file)")])
    meta = []
    if needs_meta:
        meta = load_records(meta_path, meta_fmt, step_tag=tag, skip_invalid=skip)
        no_outcome = [r.id for r in meta if r.outcome is None]
        if no_outcome and len(no_outcome) < len(meta):
            print0(f"meta  {meta_path}: left out {len(no_outcome)} records without an outcome label "
                   f"(e.g. {no_outcome[:3]})", rank=rank)
        meta = [r for r in meta if r.outcome is not None]
        if not meta:
            raise DataError([(f"--meta_file {meta_path}: no record has an outcome label; the meta pass needs "
                             "solutions labelled right/wrong (field `outcome`, `meta_label`, `passed`, ...)")])
    domains = domain_table([r.domain for r in train + meta])
    kw = {"tokenizer": tokenizer, "step_tag": tag, "max_length": cfg.data.max_length,
              "use_chat_template": cfg.model.chat_template, "domains": domains}
    train_ex, st = encode_records(train, **kw)
    print0(f"train {train_path}: {st}", rank=rank)
    meta_ex = []
    if needs_meta:
        meta_ex, sm = encode_records(meta, **kw)
        print0(f"meta  {meta_path}: {sm}", rank=rank)
    checks = [("--train_file", train_path, train_ex)] + ([("--meta_file", meta_path, meta_ex)] if needs_meta else [])
    for flag, path, ex in checks:  # every rank needs at least one example of each
        if len(ex) < world:
            raise DataError([f"{flag} {path}: {len(ex)} usable examples (within --max_length "
                             f"{cfg.data.max_length}) cannot give each of {world} ranks one; add data or use "
                             f"at most {max(1, len(ex))} ranks"])
    return train_ex, meta_ex, domains


# ---------------------------------------------------------------- run directory


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines past the checkpoint: they are logged again."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def start_wandb(cfg: Config, run_dir: Path, rank: int):
    if rank != 0 or cfg.run.disable_wandb or cfg.run.wandb_mode == "disabled":
        return None
    import wandb
    mode = cfg.run.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=cfg.run.project_name, name=cfg.run.experiment_name or run_dir.name,
                      config=cfg.to_dict(), dir=str(run_dir), mode=mode, resume="allow")


def weight_stats(wmod, baseline: bool) -> dict:
    if baseline:
        return {}
    if hasattr(wmod, "all_weights"):
        w = wmod.all_weights()
    else:
        return {}
    return {"w_mean": w.mean().item(), "w_std": w.std().item() if w.numel() > 1 else 0.0,
            "w_min": w.min().item(), "w_max": w.max().item()}


def log_row(step, window, meta, eng, wmod, wopt, cfg, seconds) -> dict:
    """One metrics.jsonl line: losses averaged over the updates since the last line."""
    n = max(1, window["n"])
    row = {"step": step, "loss": window["loss"] / n, "loss_unweighted": window["loss_unweighted"] / n}
    if window["meta_n"]:
        row.update(meta_loss=window["meta_loss"] / window["meta_n"], v_norm=meta["v_norm"],
                   align_mean=meta["align_mean"])
    row.update(lr=eng.ds.get_lr()[0], meta_lr=wopt.param_groups[0]["lr"], **weight_stats(wmod, cfg.meta.baseline),
               tokens_per_s=window["tokens"] / max(seconds, 1e-9), mem_mb=engine.peak_memory_mb(),
               time=time.time())
    return row


def resolve_resume(cfg: Config, ckpt_root: Path) -> Path | None:
    r = cfg.run.resume_from
    if r == "none":
        if engine.latest_checkpoint(ckpt_root) is not None:
            raise engine.CheckpointError(f"--resume_from none but {ckpt_root} holds checkpoints; pick another "
                                         "--output_dir, delete them, or resume with --resume_from auto")
        return None
    if r == "auto":
        return engine.latest_checkpoint(ckpt_root)
    return Path(r)


def finished_note(cfg: Config, ckpt_root: Path) -> str | None:
    """What to say when the checkpoint to resume from is already at --total_steps, else None.
    Read from its manifest, before anything is built; an unreadable one is left to the resume."""
    if cfg.run.resume_from == "none":
        return None
    ckpt = engine.latest_checkpoint(ckpt_root) if cfg.run.resume_from == "auto" else Path(cfg.run.resume_from)
    try:
        step = json.loads((ckpt / engine.MANIFEST).read_text())["step"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    total = cfg.train.total_steps
    if step < total:
        return None
    return (f"{cfg.run.output_dir} is finished: checkpoint {ckpt.name} is at update {step} and --total_steps is "
            f"{total}, so there is nothing to train; nothing was changed. To train further, run the same command "
            f"with a larger --total_steps (e.g. --total_steps {2 * step}); it resumes from update {step}. To start "
            "over, use another --output_dir.")


def progress_line(row: dict, total: int, done: int, seconds: float) -> str:
    """The plain progress line printed every log_every updates when stderr is not a terminal
    (Slurm logs, redirected output), where tqdm's bar stays off. done/seconds: updates and
    wall time of this process so far, for the ETA."""
    eta = seconds / max(done, 1) * (total - row["step"])
    meta = f"{row['meta_loss']:.4f}" if "meta_loss" in row else "-"
    return (f"update {row['step']}/{total}  loss {row['loss']:.4f}  meta loss {meta}  "
            f"tokens/s {row['tokens_per_s']:,.0f}  ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def check_resume_config(cfg: Config, saved: dict) -> None:
    diff = [f"--{k}: checkpoint has {saved[s][k]!r}, this run {getattr(getattr(cfg, s), k)!r}"
            for s, k in RESUME_MUST_MATCH if saved.get(s, {}).get(k) != getattr(getattr(cfg, s), k)]
    if diff:
        raise engine.CheckpointError("cannot resume: the run config differs from the checkpoint's:\n  "
                                     + "\n  ".join(diff) + "\nuse the same settings or a new --output_dir")


# ---------------------------------------------------------------- periodic evaluation


def run_eval(eng, eval_ex, cfg: Config) -> dict:
    """eval_* metrics on --eval_file (all ranks take part); dropout off, the train mode restored after."""
    module = eng.ds.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return eval_step_metrics(lambda b: engine.forward(eng, b, meta=True), eval_ex, cfg.train.batch_size,
                                     eng.rank, eng.world, eng.tokenizer.pad_token_id)
    finally:
        module.train(was_training)


# ---------------------------------------------------------------- the loop


class _StopFlag:
    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum


def fit(cfg: Config, notes=()) -> int:
    rank, world = engine.init_distributed()
    for n in notes:
        print0(n, rank=rank)
    run_dir = Path(cfg.run.output_dir)
    ckpt_root = run_dir / "checkpoints"
    bilevel = not cfg.meta.baseline
    torch.manual_seed(cfg.train.seed)
    if cfg.run.debug:
        torch.autograd.set_detect_anomaly(True)

    # Installed first, so a signal during startup (model build, data loading) also ends cleanly.
    stop = _StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    lock = None
    if not cfg.run.dry_run:  # rank 0 holds the run directory; every rank learns the outcome
        try:
            lock, note = runlock.acquire(run_dir) if rank == 0 else (None, None)
            err = None
        except runlock.RunLockError as e:
            note, err = None, str(e)
        note, err = engine.broadcast_object((note, err))
        if err:
            raise runlock.RunLockError(err)
        if note:
            print0(note, rank=rank)
    try:
        done = None if cfg.run.dry_run else finished_note(cfg, ckpt_root)
        if done:  # nothing to train: status.json, metrics and wandb are left as they are
            print0(done, rank=rank)
            return 0
        return _fit(cfg, rank, world, run_dir, ckpt_root, bilevel, stop)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if lock is not None:
            runlock.release(lock)


def _fit(cfg: Config, rank: int, world: int, run_dir: Path, ckpt_root: Path, bilevel: bool, stop) -> int:
    eng = engine.create_engine(cfg, rank, world)
    pad_id = eng.tokenizer.pad_token_id
    train_ex, meta_ex, domains = load_data(cfg, eng.tokenizer, rank, needs_meta=bilevel, world=world)
    eval_ex = []
    if cfg.run.eval_every:
        eval_ex, se = load_eval_examples(cfg, eng.tokenizer, domains)
        print0(f"eval  {cfg.data.eval_file}: {se}", rank=rank)
    wmod = build_weight_module(cfg.meta.weights, len(train_ex), len(domains), cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta.meta_lr)
    train_stream = with_workers(BatchStream(train_ex, cfg.train.batch_size, pad_id, rank, world, cfg.train.seed),
                                cfg.data.num_workers)
    meta_stream = (BatchStream(meta_ex, cfg.meta.meta_batch_size, pad_id, rank, world, cfg.train.seed + 1)
                   if bilevel else None)
    n_train = sum(p.numel() if eng.stage != 3 else p.ds_numel for p in eng.params)
    print0(f"ranks {world}, ZeRO stage {eng.stage}, {cfg.train.precision}, mode {cfg.model.mode}: "
           f"{n_train:,} trainable parameters; weights {cfg.meta.weights if bilevel else 'uniform (baseline)'}"
           f"{', hypergradient ' + cfg.meta.hypergrad if bilevel else ''}", rank=rank)
    if cfg.run.dry_run:
        print0("dry run: config, data and model are valid; exiting before training", rank=rank)
        return 0

    start = 0
    resume = resolve_resume(cfg, ckpt_root)
    if resume is not None:
        shared, per_rank = engine.load_checkpoint(eng, resume)
        check_resume_config(cfg, shared["config"])
        wmod.load_state_dict(shared["weights"])
        wopt.load_state_dict(shared["weights_opt"])
        train_stream.load_state_dict(per_rank["train_stream"])
        if meta_stream is not None:
            meta_stream.load_state_dict(per_rank["meta_stream"])
        start = shared["step"]
        print0(f"resumed from {resume} at update {start}", rank=rank)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        truncate_metrics(run_dir / "metrics.jsonl", start)
    engine.barrier()

    if engine.all_reduce_(torch.tensor([float(stop.signum)])).item() > 0:
        if rank == 0:
            write_json_atomic(run_dir / "status.json", {"state": "stopped", "step": start, "updated": time.time()})
        print0(f"stopped by signal during startup at update {start}", rank=rank)
        return 128 + (stop.signum or signal.SIGTERM)
    wb = start_wandb(cfg, run_dir, rank)
    status = {"state": "running", "step": start, "total_steps": cfg.train.total_steps, "last_checkpoint": None}

    def checkpoint(step):
        path = engine.save_checkpoint(
            eng, ckpt_root, step,
            shared={"config": cfg.to_dict(), "weights": wmod.state_dict(), "weights_opt": wopt.state_dict()},
            per_rank={"train_stream": train_stream.state_dict(),
                      "meta_stream": meta_stream.state_dict() if meta_stream else {}},
            keep_last=cfg.run.keep_last)
        status["last_checkpoint"] = str(path)
        return path

    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.total_steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
    log_every = 1 if cfg.run.debug else cfg.run.log_every
    t_last, step, meta = time.perf_counter(), start, {}
    t_start, tokens_total = t_last, 0
    last_w = torch.full((len(train_ex),), -1.0)  # weight each instance got when last trained on
    window = {"n": 0, "tokens": 0, "loss": 0.0, "loss_unweighted": 0.0, "meta_n": 0, "meta_loss": 0.0}
    try:
        for step in range(start + 1, cfg.train.total_steps + 1):
            out = engine.inner_update(eng, train_stream, wmod, cfg.meta.baseline, step)
            for r in out["recent"]:
                last_w[r["batch"]["index"].cpu()] = r["weights"].cpu().float()
            window["n"] += 1
            window["tokens"] += out["tokens"]
            tokens_total += out["tokens"]
            window["loss"] += out["loss"]
            window["loss_unweighted"] += out["loss_unweighted"]
            if bilevel and step % cfg.meta.meta_interval == 0:
                meta = engine.meta_update(eng, next(meta_stream), out["recent"], wmod, wopt, cfg, step)
                window["meta_n"] += 1
                window["meta_loss"] += meta["meta_loss"]
            # periodic evaluation: every rank takes part; its metrics get a row of their own
            evals = run_eval(eng, eval_ex, cfg) if eval_ex and step % cfg.run.eval_every == 0 else {}
            if step % log_every == 0 or step == cfg.train.total_steps or evals:
                row = {**log_row(step, window, meta, eng, wmod, wopt, cfg, time.perf_counter() - t_last), **evals}
                t_last = time.perf_counter()
                window = dict.fromkeys(window, 0)
                if rank == 0:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if wb is not None:
                        wb.log(row, step=step)
                    if bar is not None and bar.disable:
                        print0(progress_line(row, cfg.train.total_steps, step - start,
                                             time.perf_counter() - t_start))
                    status.update(step=step, loss=row["loss"], meta_loss=row.get("meta_loss"))
                    write_json_atomic(run_dir / "status.json", {**status, "updated": time.time()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", meta=f"{meta.get('meta_loss', math.nan):.4f}")
            stopping = engine.all_reduce_(torch.tensor([float(stop.signum)])).item() > 0
            if step % cfg.run.save_every == 0 or step == cfg.train.total_steps or stopping:
                checkpoint(step)
            if stopping:
                print0(f"stopped by signal at update {step}; checkpoint {status['last_checkpoint']}. "
                       "Run the same command again to resume.", rank=rank)
                status["state"] = "stopped"
                return 128 + (stop.signum or signal.SIGTERM)
        status["state"] = "finished"
        dump_instance_weights(wmod, train_ex, last_w, run_dir, rank, cfg.meta.baseline, domains)
        seconds = time.perf_counter() - t_start
        meta_loss = status.get("meta_loss")
        print0(f"finished: {step - start} updates in {_hms(seconds)} (update {step} of {cfg.train.total_steps}), "
               f"{tokens_total / max(seconds, 1e-9):,.0f} tokens/s over all ranks; "
               f"last logged loss {status.get('loss', math.nan):.4f}"
               + (f", meta loss {meta_loss:.4f}" if meta_loss is not None else "")
               + f"; checkpoint {status['last_checkpoint']}; instance weights {run_dir / 'instance_weights.jsonl'}",
               rank=rank)
        return 0
    except BaseException as e:
        status.update(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if bar is not None:
            bar.close()
        if rank == 0 and run_dir.is_dir():
            status["step"] = step
            write_json_atomic(run_dir / "status.json", {**status, "updated": time.time()})
        if wb is not None:
            wb.finish()


def dump_instance_weights(wmod, train_ex, last_w: torch.Tensor, run_dir: Path, rank: int, baseline: bool,
                          domains: list[str]):
    """instance_weights.jsonl: the learned weight of every training record, by id, with its
    domain by name (null for a record without one).

    Tables give every row's current weight; the instance net's weight depends on features
    seen in training, so it is the weight it gave the record when last trained on (null if
    never). last_w holds those, -1 where unseen, max-reduced over ranks.
    """
    last_w = engine.all_reduce_(last_w.clone(), op=torch.distributed.ReduceOp.MAX)
    if rank != 0:
        return
    if baseline:
        w = torch.ones(len(train_ex))
    elif isinstance(wmod, InstanceTable):
        w = wmod.all_weights()
    elif isinstance(wmod, DomainTable):
        w = wmod.all_weights()[torch.tensor([ex.domain for ex in train_ex])]
    else:
        w = torch.where(last_w >= 0, last_w, torch.full_like(last_w, math.nan))
    with open(run_dir / "instance_weights.jsonl", "w") as f:
        for ex, wi in zip(train_ex, w.tolist()):
            wi = None if math.isnan(wi) else wi
            domain = domains[ex.domain] if ex.domain else None  # index 0: no domain
            f.write(json.dumps({"id": ex.id, "index": ex.index, "domain": domain, "weight": wi}) + "\n")
