"""What a run reports: the metrics window, metrics.jsonl, wandb, the progress line, the end-of-run summary
and instance_weights.jsonl.

Every `log_every` updates (and at the last update, and with every evaluation) one metrics.jsonl row holds
the losses averaged over the updates since the previous row, the last meta pass's statistics, learning
rates, weight statistics, tokens/s, peak memory and per-source sums (summed over ranks). Rank 0 writes;
every rank takes part in the reductions.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt
from dreamprm import dist
from dreamprm.errors import DataError


def print0(*args, rank: int = 0) -> None:
    """print on rank 0. A stdout that went away (Ctrl+C under `deepspeed ... | tee log` ends tee too) must not
    turn a clean stop into a failure: it is pointed at /dev/null and the run goes on to its checkpoint."""
    if rank == 0:
        try:
            print(*args, flush=True)
        except BrokenPipeError:
            to_devnull(sys.stdout)


def to_devnull(stream) -> None:
    """Point a stream's file descriptor at /dev/null (what is still buffered, and all later writes, go there)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stream.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): nothing to point
        pass


def truncate_metrics(path: Path, step: int) -> str | None:
    """After a resume, drop metric lines past the checkpoint: they are logged again.

    A torn last line (the writer was killed mid-line) is dropped with a note; a line that is
    not JSON anywhere else is a DataError naming it."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    keep, note = [], None
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines):
                note = f"{path}:{i}: dropped a torn last line (the writer was stopped while writing it)"
                continue
            raise DataError([f"{path}:{i}: not JSON ({e}); delete that line to resume"]) from e
        if row["step"] <= step:
            keep.append(ln)
    ckpt.write_atomic(path, "".join(ln + "\n" for ln in keep))
    return note


def wandb_mode(cfg) -> str:
    """online / offline / disabled. WANDB_MODE=disabled in the environment wins over the recipe (turning
    logging off for one run needs no edit); auto = online with an API key, else offline."""
    if cfg.run.disable_wandb or cfg.run.wandb_mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.run.wandb_mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.run.wandb_mode


def start_wandb(cfg, run_dir: Path, rank: int):
    mode = wandb_mode(cfg)
    if rank != 0 or mode == "disabled":
        return None
    import wandb
    # quiet and silent: wandb's banner, sync hints and run summary were most of a demo's output (its
    # offline run is under RUN/wandb; `wandb sync` uploads it)
    return wandb.init(project=cfg.run.project_name, name=cfg.run.experiment_name or run_dir.name,
                      config=cfg.to_dict(), dir=str(run_dir), mode=mode, resume="allow",
                      settings=wandb.Settings(quiet=True, silent=True))


def weight_stats(wmod, baseline: bool) -> dict:
    w = None if baseline else wmod.instance_weights()
    if w is None:  # uniform, or the instance net (its weights depend on features)
        return {}
    return {"w_mean": w.mean().item(), "w_std": w.std().item() if w.numel() > 1 else 0.0,
            "w_min": w.min().item(), "w_max": w.max().item()}


def source_row(names: list[str], sums: torch.Tensor, stream) -> dict:
    """Per-source metrics from summed [n, loss, weight] rows: instances, mean loss, mean weight, and the
    current sampling probability for a mixture stream."""
    row = {}
    probs = getattr(getattr(stream, "stream", stream), "probs", None)
    for k, name in enumerate(names):
        n = sums[k, 0].item()
        row[f"src/{name}/n"] = n
        if n:  # a source not drawn in the window has no mean
            row[f"src/{name}/loss"] = sums[k, 1].item() / n
            row[f"src/{name}/w"] = sums[k, 2].item() / n
        if probs is not None:
            row[f"src/{name}/p"] = float(probs[k])
    return row


def progress_line(row: dict, total: int, done: int, seconds: float) -> str:
    """The plain progress line printed every log_every updates when stderr is not a terminal
    (Slurm logs, redirected output), where tqdm's bar stays off. done/seconds: updates and
    wall time of this process so far, for the ETA."""
    eta = seconds / max(done, 1) * (total - row["step"])
    meta = f"{row['meta_loss']:.4f}" if "meta_loss" in row else "-"
    return (f"update {row['step']}/{total}  loss {row['loss']:.4f}  meta loss {meta}  "
            f"tokens/s {row['tokens_per_s']:,.0f}  ETA {hms(eta)}")


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLog:
    """The metrics of one process of a run, from its first update to its summary.

    status: the run guard's status dict (step, loss and meta loss are recorded in it at every row).
    """

    def __init__(self, cfg, run_dir: Path, rank: int, names: list[str], start: int, status: dict, write_status):
        self.cfg, self.run_dir, self.rank, self.names = cfg, run_dir, rank, names
        self.status, self.write_status = status, write_status
        self.start = start
        self.every = 1 if cfg.run.debug else cfg.run.log_every
        self.wandb = start_wandb(cfg, run_dir, rank)
        self.bar = None
        if rank == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.total_steps, initial=start, desc="train", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
        self.t_start = self.t_last = time.perf_counter()
        self.tokens_total = 0
        self.printed = start  # the update of the last progress line printed
        self.meta: dict = {}  # the last meta pass's statistics
        self.window = {"n": 0, "tokens": 0, "loss": 0.0, "loss_unweighted": 0.0, "meta_n": 0, "meta_loss": 0.0}
        self.src_window = torch.zeros(len(names), 3, dtype=torch.float64)

    def update(self, out: dict, meta: dict | None) -> None:
        """An update's sums (inner_update's result) and its meta pass's, if it had one."""
        w = self.window
        w["n"] += 1
        w["tokens"] += out["tokens"]
        self.tokens_total += out["tokens"]
        w["loss"] += out["loss"]
        w["loss_unweighted"] += out["loss_unweighted"]
        if meta is not None:
            self.meta = meta
            w["meta_n"] += 1
            w["meta_loss"] += meta["meta_loss"]

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.train.total_steps

    def row(self, step: int, lr: float, state, train_stream, evals: dict) -> None:
        """One metrics.jsonl row (a collective: the per-source sums are reduced over the ranks)."""
        w, n = self.window, max(1, self.window["n"])
        seconds = time.perf_counter() - self.t_last
        row = {"step": step, "loss": w["loss"] / n, "loss_unweighted": w["loss_unweighted"] / n}
        if w["meta_n"]:
            row.update(meta_loss=w["meta_loss"] / w["meta_n"], v_norm=self.meta["v_norm"],
                       align_mean=self.meta["align_mean"])
        row.update(lr=lr, **({"meta_lr": state.wopt.param_groups[0]["lr"]} if state.wopt is not None else {}),
                   **weight_stats(state.wmod, self.cfg.meta.baseline),
                   tokens_per_s=w["tokens"] / max(seconds, 1e-9), mem_mb=peak_memory_mb(), time=time.time())
        row.update(**source_row(self.names, dist.all_reduce_(self.src_window), train_stream), **evals)
        self.t_last = time.perf_counter()
        self.window = dict.fromkeys(w, 0)
        self.src_window = torch.zeros_like(self.src_window)
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.bar is not None and self.bar.disable:
            print0(progress_line(row, self.cfg.train.total_steps, step - self.start,
                                 time.perf_counter() - self.t_start))
            self.printed = step
        self.status.update(step=step, loss=row["loss"], meta_loss=row.get("meta_loss"))
        self.write_status()

    def tick(self, out: dict, step: int) -> None:
        """After update `step` and its metrics row, if any: the bar moves on; without a bar (a log file), the
        first update of the process gets a progress line at once, so a log with a large log_every shows that
        training runs (metrics.jsonl keeps its rows every log_every updates)."""
        if self.bar is None:
            return
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{out['loss']:.4f}", meta=f"{self.meta.get('meta_loss', math.nan):.4f}")
        elif step == self.start + 1 and self.printed != step:
            seconds = time.perf_counter() - self.t_start
            row = {"step": step, "loss": out["loss"], "tokens_per_s": self.tokens_total / max(seconds, 1e-9),
                   **({"meta_loss": self.meta["meta_loss"]} if self.meta else {})}
            print0(progress_line(row, self.cfg.train.total_steps, 1, seconds))
            self.printed = step

    def close_bar(self) -> None:
        """Before the end-of-run lines: a bar left open on a terminal redraws over them."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, totals: torch.Tensor, train_stream, step: int) -> None:
        """The end of a finished run: per-source totals (into status.json and wandb) and one line."""
        summary = source_row(self.names, totals, train_stream)
        self.close_bar()
        self.status["sources"] = summary
        if self.wandb is not None:
            self.wandb.summary.update(summary)
        print0("per source over the run: " + ", ".join(
            f"{n}: {summary[f'src/{n}/n']:.0f} instances, loss {summary.get(f'src/{n}/loss', math.nan):.4f}, "
            f"weight {summary.get(f'src/{n}/w', math.nan):.3f}" for n in self.names), rank=self.rank)
        seconds = time.perf_counter() - self.t_start
        meta_loss = self.status.get("meta_loss")
        print0(f"finished: {step - self.start} updates in {hms(seconds)} (update {step} of "
               f"{self.cfg.train.total_steps}), {self.tokens_total / max(seconds, 1e-9):,.0f} tokens/s over all "
               f"ranks; last logged loss {self.status.get('loss', math.nan):.4f}"
               + (f", meta loss {meta_loss:.4f}" if meta_loss is not None else "")
               + f"; checkpoint {self.status['last_checkpoint']}; instance weights "
               f"{self.run_dir / 'instance_weights.jsonl'}", rank=self.rank)

    def close(self) -> None:
        self.close_bar()
        if self.wandb is not None:
            self.wandb.finish()


def dump_instance_weights(wmod, train_ex, last_w: torch.Tensor, run_dir: Path, rank: int, baseline: bool,
                          domains: list[str], saved: Path):
    """instance_weights.jsonl: the learned weight of every training record, by id, with its
    domain by name (null for a record without one), and the checkpoint just saved (step and
    checkpoint.manifest_id), so that a reader can tell weights of a checkpoint the run set aside.

    Tables give every row's current weight; the instance net's weight depends on features
    seen in training, so it is the weight it gave the record when last trained on (null if
    never). last_w holds those, -1 where unseen, max-reduced over ranks.
    """
    last_w = dist.all_reduce_(last_w.clone(), op=torch.distributed.ReduceOp.MAX)
    if rank != 0:
        return
    w = torch.ones(len(train_ex)) if baseline else wmod.instance_weights()
    if w is None:  # the instance net: the weight each record was last trained with
        w = torch.where(last_w >= 0, last_w, torch.full_like(last_w, math.nan))
    at = {"step": ckpt.step_of(saved.name), "manifest": ckpt.manifest_id(saved)}
    rows = [{"id": ex.id, "index": ex.index, "domain": domains[ex.domain] if ex.domain else None,  # 0: none
             "weight": None if math.isnan(wi) else wi, **at} for ex, wi in zip(train_ex, w.tolist())]
    ckpt.write_atomic(run_dir / "instance_weights.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
