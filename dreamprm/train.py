"""The training loop: plain functions around engine.inner_update and bilevel.meta_update.

    fit(cfg)
      init process group -> tokenizer, data -> engine (PRM + DeepSpeed; the inner loss measured on
      the data) -> weight module -> resume (latest complete checkpoint) -> for each update:
           inner_update; every meta_interval updates meta_update (--hypergrad fused: the meta
           gradient before inner_update, whose backward also takes the alignments);
           log metrics.jsonl / status.json / wandb; checkpoint every save_every;
           stop cleanly on SIGTERM / Ctrl+C (checkpoint first)
      -> final checkpoint, instance weights per id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt
from dreamprm import dist, engine, runlock
from dreamprm.bilevel import fused_meta_gradient, meta_update
from dreamprm.config import Config, save_config
from dreamprm.data.loader import BatchStream, collate, with_workers
from dreamprm.data.mixing import Curriculum, MixtureStream, Source, mixture_probs, parse_sources
from dreamprm.data.mixing import read_sources as read_all_sources
from dreamprm.data.packing import check_attention, collate_packed
from dreamprm.data.tokenize import domain_table, encode_records, profile_problems, run_profiles
from dreamprm.errors import CheckpointError, CollectiveError, ConfigError, DataError
from dreamprm.hypergrad import StepLoss
from dreamprm.model import load_training_tokenizer, resolve_attn
from dreamprm.train_eval import eval_step_metrics, load_eval_examples
from dreamprm.weights import build_weight_module, build_weight_optimizer

DEMO_DIR = Path(__file__).parent / "demo"
# Fields that must agree between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = [("data", "train_file"), ("data", "meta_file"), ("data", "max_length"),
                     ("model", "name_or_path"), ("model", "mode"), ("model", "lora_r"),
                     ("model", "step_tag"), ("meta", "weights"), ("meta", "baseline"),
                     ("data", "mix"), ("data", "curriculum"), ("data", "profile"), ("data", "system_prompt"),
                     ("data", "prompt_template"),
                     ("train", "batch_size"), ("train", "grad_accum"), ("train", "seed")]


def print0(*args, rank: int = 0) -> None:
    if rank == 0:
        print(*args, flush=True)


# ---------------------------------------------------------------- data


def data_paths(cfg: Config) -> tuple[str, str, str, str]:
    """(train file(s), train format, meta file(s), meta format) for messages; several sources are joined by
    ', '. Empty paths mean the demo data."""
    train, meta = train_sources(cfg)
    return (", ".join(s.path for s in train), cfg.data.train_format if cfg.data.train_file else "minif2f",
            ", ".join(s.path for s in meta), cfg.data.meta_format if cfg.data.train_file else "minif2f")


def train_sources(cfg: Config) -> tuple[list[Source], list[Source]]:
    """The training and meta sources of the run (the bundled demo files when --train_file is empty)."""
    d = cfg.data
    if not d.train_file:
        return ([Source("--train_file", str(DEMO_DIR / "train.jsonl"), "train", "minif2f", None)],
                [Source("--meta_file", str(DEMO_DIR / "meta.jsonl"), "meta", "minif2f", None)])
    train, p1 = parse_sources(d.train_file, "--train_file", d.train_format)
    meta, p2 = parse_sources(d.meta_file, "--meta_file", d.meta_format)
    if p1 or p2:  # load_config validated them; a Config built in code may not be
        raise ConfigError(p1 + p2)
    return train, meta


@dataclass
class Data:
    train_ex: list
    meta_ex: list
    domains: list[str]
    train_sources: list[Source]
    meta_sources: list[Source]
    source_of: list[int]  # training example -> its source
    difficulty: list[float] | None  # training example -> curriculum difficulty (None: no curriculum)
    profiles: dict  # profile name -> Profile, those the sources use
    pos_fraction: float  # positive share of the training step labels (hard-rounded with --hard_labels)


def read_sources(cfg: Config, needs_meta: bool) -> tuple[list[list], list[list]]:
    """The records of every source (mixing.read_sources), or one DataError listing every source's problems."""
    train_src, meta_src = train_sources(cfg)
    train, meta, problems = read_all_sources(train_src, meta_src if needs_meta else [], cfg.model.step_tag,
                                             cfg.data.skip_invalid)
    if problems:
        raise DataError(problems)
    return train, meta


def load_mixture(cfg: Config, tokenizer, rank: int, needs_meta: bool, world: int = 1, records=None) -> Data:
    """Read (or take from read_sources), validate and tokenize every source; every count is printed.

    Each source gets its domain (Source.domain, else the records' own) and its prompt profile. Training
    examples of all sources are concatenated in source order, Example.index dense over them.
    """
    train_src, meta_src = train_sources(cfg)
    train_recs, meta_recs = records if records is not None else read_sources(cfg, needs_meta)
    for s, recs in zip(train_src + meta_src, train_recs + meta_recs):
        if s.domain is not None:
            for r in recs:
                r.domain = s.domain
    meta_kept = []
    for s, recs in zip(meta_src, meta_recs):
        no_outcome = [r.id for r in recs if r.outcome is None]
        if no_outcome:
            print0(f"meta  {s.where()}: left out {len(no_outcome)} records without an outcome label "
                   f"(e.g. {no_outcome[:3]})", rank=rank)
        meta_kept.append([r for r in recs if r.outcome is not None])
    domains = domain_table([r.domain for recs in train_recs + meta_kept for r in recs])
    all_profiles = run_profiles(cfg.data.system_prompt, cfg.data.prompt_template)
    used = {s.profile or cfg.data.profile for s in train_src + meta_src}
    problems = [q for name in sorted(used) for q in profile_problems(all_profiles[name])]
    difficulty = None
    if cfg.data.curriculum == "difficulty":
        difficulty = []
        for s, recs in zip(train_src, train_recs):
            bad = [r.id for r in recs if isinstance((r.meta or {}).get("difficulty"), bool)
                   or not isinstance((r.meta or {}).get("difficulty"), (int, float))]
            if bad:
                problems.append(f"{s.where()}: --curriculum difficulty needs a number in meta.difficulty; "
                                f"{len(bad)} records have none (e.g. {bad[:3]})")
    if problems:
        raise DataError(problems)

    def encode(sources, recs_per_source, what):
        out, source_of = [], []
        for k, (s, recs) in enumerate(zip(sources, recs_per_source)):
            ex, st = encode_records(recs, tokenizer=tokenizer, step_tag=cfg.model.step_tag,
                                    max_length=cfg.data.max_length, use_chat_template=cfg.model.chat_template,
                                    domains=domains, profile=all_profiles[s.profile or cfg.data.profile])
            print0(f"{what} {s.where()}: {st}", rank=rank)
            for e in ex:
                e.index += len(out)
            out += ex
            source_of += [k] * len(ex)
            need = world if (len(sources) > 1 or what == "meta ") else 1
            if len(ex) < max(1, need):
                problems.append(f"{s.where()}: {len(ex)} usable examples (within --max_length "
                                f"{cfg.data.max_length}); each source needs at least {max(1, need)} (one per rank)")
        return out, source_of

    train_ex, source_of = encode(train_src, train_recs, "train")
    meta_ex = encode(meta_src, meta_kept, "meta ")[0] if needs_meta else []
    checks = [("--train_file", train_ex)] + ([("--meta_file", meta_ex)] if needs_meta else [])
    for flag, ex in checks:  # every rank needs at least one example of each
        if len(ex) < world:
            problems.append(f"{flag} {data_paths(cfg)[0 if flag == '--train_file' else 2]}: {len(ex)} usable "
                            f"examples (within --max_length {cfg.data.max_length}) cannot give each of {world} "
                            f"ranks one; add data or use at most {max(1, len(ex))} ranks")
    if problems:
        raise DataError(problems)
    if difficulty is not None:
        by_id = [{r.id: float(r.meta["difficulty"]) for r in recs} for recs in train_recs]
        difficulty = [by_id[s][e.id] for e, s in zip(train_ex, source_of)]
    elif cfg.data.curriculum == "steps":
        difficulty = [float(e.n_steps) for e in train_ex]
    elif cfg.data.curriculum == "length":
        difficulty = [float(len(e.input_ids)) for e in train_ex]
    labels = [(y >= 0.5) if cfg.train.hard_labels else y for e in train_ex for y in e.labels if not math.isnan(y)]
    pos = float(sum(labels) / len(labels)) if labels else math.nan
    print0(f"train step labels: {len(labels)} labelled steps, positive fraction {pos:.4f}"
           + (" (labels rounded to 0/1)" if cfg.train.hard_labels else ""), rank=rank)
    return Data(train_ex, meta_ex, domains, train_src, meta_src, source_of, difficulty,
                {n: all_profiles[n] for n in sorted(used)}, pos)


def load_data(cfg: Config, tokenizer, rank: int, needs_meta: bool, world: int = 1):
    """(training examples, meta examples, domain table): load_mixture without the per-source details."""
    d = load_mixture(cfg, tokenizer, rank, needs_meta, world)
    return d.train_ex, d.meta_ex, d.domains


def step_loss_spec(cfg: Config, pos_fraction: float) -> StepLoss:
    """The inner loss of the run; balanced_ce takes --pos_fraction, or the one measured on the training data."""
    t = cfg.train
    pf = t.pos_fraction or pos_fraction
    if t.step_loss == "balanced_ce" and not 0 < pf < 1:
        raise DataError([f"--step_loss balanced_ce: the training step labels have positive fraction {pf} (one "
                         "class only); class balance needs both, or set --pos_fraction"])
    return StepLoss(t.step_loss, t.hard_labels, t.focal_gamma, pf if 0 < pf < 1 else 0.5)


def train_stream_for(cfg: Config, data: Data, pad_id: int, rank: int, world: int, wmod=None):
    """BatchStream over all sources (--mix size without curriculum: each example once per epoch, so sources are
    drawn in proportion to their size), else a MixtureStream."""
    d = cfg.data
    if d.mix == "size" and d.curriculum == "none":
        return with_workers(BatchStream(data.train_ex, cfg.train.batch_size, pad_id, rank, world, cfg.train.seed,
                                        collate_fn=collate_fn(cfg)), d.num_workers)
    curriculum = None
    if d.curriculum != "none":
        ramp = (d.curriculum_steps or cfg.train.total_steps) * cfg.train.grad_accum
        curriculum = Curriculum(d.curriculum_start, ramp, d.curriculum_schedule)
    stream = MixtureStream(data.train_ex, data.source_of, cfg.train.batch_size, pad_id,
                           source_probs(cfg, data, wmod), rank, world, cfg.train.seed, curriculum, data.difficulty,
                           collate_fn(cfg))
    return with_workers(stream, d.num_workers)


def source_probs(cfg: Config, data: Data, wmod=None):
    """Sampling probability of every training source now (learned: from the domain table's weights)."""
    sizes = [data.source_of.count(k) for k in range(len(data.train_sources))]
    dw = None
    if cfg.data.mix == "learned" and wmod is not None:
        w = wmod.row_weights()
        dw = [float(w[data.domains.index(s.domain)]) for s in data.train_sources]
    return mixture_probs(sizes, cfg.data.mix, cfg.data.mix_alpha, [s.weight for s in data.train_sources], dw)


def collate_fn(cfg: Config):
    """Padded batches, or with --packing data.packing.collate_packed: rows as long as the batch's longest
    example for sdpa/eager (block-diagonal mask from the restarting position ids), one unpadded row for
    flash_attention_2 (its varlen path needs batch size 1). The batch order and the stream state are
    the same either way, so a packed run resumes like a padded one."""
    if not cfg.data.packing:
        return collate
    attn = resolve_attn(cfg.model.attn_implementation)
    check_attention(attn)
    return partial(collate_packed, one_row=attn == "flash_attention_2")


# ---------------------------------------------------------------- run directory


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
    ckpt.write_text_atomic(path, "".join(ln + "\n" for ln in keep))
    return note


def write_status(run_dir: Path, status: dict) -> None:
    """status.json; a failure to write it (disk full, read-only) is reported, not raised, so
    that it never hides the error that ended the run."""
    try:
        ckpt.write_json_atomic(run_dir / "status.json", {**status, "updated": time.time()})
    except OSError as e:
        print(f"dreamprm: could not record state {status.get('state')!r} in status.json: {e}", file=sys.stderr)


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
    w = None if baseline else wmod.instance_weights()
    if w is None:  # uniform, or the instance net (its weights depend on features)
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


def resolve_resume(cfg: Config, ckpt_root: Path, problems_of=None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes about the ones passed over.

    --resume_from auto: `latest`, else the newest intact checkpoint of its lineage, saying why
    (checkpoint.resume_candidates); a named checkpoint is used as it is or refused.
    problems_of(path) -> list of problems (default: checkpoint.verify reading every checksum);
    the trainer passes engine.verify_on_every_rank, which shares the reading among the ranks."""
    if problems_of is None:
        def problems_of(path):
            try:
                ckpt.verify(path)
                return []
            except CheckpointError as e:
                return [str(e)]
    r = cfg.run.resume_from
    if r == "none":
        if ckpt.latest(ckpt_root) is not None or ckpt.complete(ckpt_root):
            raise CheckpointError(f"--resume_from none but {ckpt_root} holds checkpoints; pick another "
                                  "--output_dir, delete them, or resume with --resume_from auto")
        return None, []
    if r != "auto":
        problems = problems_of(Path(r))
        if problems:
            raise CheckpointError(problems[0])
        return Path(r), []
    notes = []
    for cand in ckpt.resume_candidates(ckpt_root):
        problems = problems_of(cand)
        if not problems:
            return cand, notes
        notes.append(f"{problems[0]}; trying the previous checkpoint of this run")
    if notes:
        raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(notes)
                              + f"\nstart a new run (another --output_dir, or --resume_from none after "
                              f"moving {ckpt_root} away)")
    return None, []


def finished_note(cfg: Config, ckpt_root: Path) -> str | None:
    """What to say when the checkpoint to resume from is already at --total_steps, else None.
    Read from its manifest, before anything is built; an unreadable one is left to the resume."""
    if cfg.run.resume_from == "none":
        return None
    try:
        path = ckpt.latest(ckpt_root) if cfg.run.resume_from == "auto" else Path(cfg.run.resume_from)
        step = json.loads((path / ckpt.MANIFEST).read_text())["step"]
    except (TypeError, OSError, ValueError, KeyError, CheckpointError):
        return None
    total = cfg.train.total_steps
    if step < total:
        return None
    return (f"{cfg.run.output_dir} is finished: checkpoint {path.name} is at update {step} and --total_steps is "
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
    default = Config()  # an option the checkpoint predates had its default value then

    def was(s, k):
        return saved.get(s, {}).get(k, getattr(getattr(default, s), k))

    diff = [f"--{k}: checkpoint has {was(s, k)!r}, this run {getattr(getattr(cfg, s), k)!r}"
            for s, k in RESUME_MUST_MATCH if was(s, k) != getattr(getattr(cfg, s), k)]
    if diff:
        raise CheckpointError("cannot resume: the run config differs from the checkpoint's:\n  "
                              + "\n  ".join(diff) + "\nuse the same settings or a new --output_dir")


# ---------------------------------------------------------------- periodic evaluation


def run_eval(eng, eval_ex, cfg: Config) -> dict:
    """eval_* metrics on --eval_file (all ranks take part); dropout off, the train mode restored after."""
    module = eng.ds.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return eval_step_metrics(lambda b: eng.forward(b, meta=True), eval_ex, cfg.train.batch_size,
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
    rank, world = engine.init_distributed(cfg.run.collective_timeout)
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
        note, err = dist.broadcast_object((note, err))
        if err:
            raise runlock.RunLockError(err)
        if note:
            print0(note, rank=rank)
    try:
        done = None if cfg.run.dry_run else finished_note(cfg, ckpt_root)
        if done:  # nothing to train: status.json, metrics and wandb are left as they are
            print0(done, rank=rank)
            return 0
        resume = None if cfg.run.dry_run else find_resume(cfg, ckpt_root, rank)
        universal = engine.universal_copy(resume, world, rank) if resume is not None else None
        return _fit(cfg, rank, world, run_dir, ckpt_root, bilevel, stop, resume, universal)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if lock is not None:
            runlock.release(lock)


def find_resume(cfg: Config, ckpt_root: Path, rank: int) -> Path | None:
    """Before the model is built: partial saves removed, the checkpoint to resume from chosen
    and verified (every rank reads a share of the checksums), its config checked."""
    if rank == 0 and ckpt_root.is_dir():
        for n in ckpt.remove_partial(ckpt_root):
            print0(n, rank=rank)
    dist.barrier()
    resume, notes = resolve_resume(cfg, ckpt_root, lambda p: engine.verify_on_every_rank(p)[1])
    for n in notes:
        print0(n, rank=rank)
    if resume is not None:
        check_resume_config(cfg, ckpt.shared_state(resume)["config"])
        if notes:
            print0(f"falling back to {resume}, the newest intact checkpoint of this run", rank=rank)
    return resume


def _fit(cfg: Config, rank: int, world: int, run_dir: Path, ckpt_root: Path, bilevel: bool, stop,
         resume: Path | None, universal: Path | None = None) -> int:
    records = read_sources(cfg, needs_meta=bilevel)  # every source's problems, before any model is built
    tokenizer = load_training_tokenizer(cfg.model)
    data = load_mixture(cfg, tokenizer, rank, needs_meta=bilevel, world=world, records=records)
    train_ex, meta_ex, domains = data.train_ex, data.meta_ex, data.domains
    eng = engine.create_engine(cfg, rank, world, step_loss_spec(cfg, data.pos_fraction), tokenizer=tokenizer,
                               load_universal=universal is not None)
    pad_id = eng.tokenizer.pad_token_id
    eval_ex = []
    if cfg.run.eval_every:
        eval_ex, se = load_eval_examples(cfg, eng.tokenizer, domains)
        print0(f"eval  {cfg.data.eval_file}: {se}", rank=rank)
    wmod = build_weight_module(cfg.meta.weights, [ex.domain for ex in train_ex], len(domains), cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta, cfg.train.batch_size * cfg.train.grad_accum * world)
    learned_mix = cfg.data.mix == "learned"
    train_stream = train_stream_for(cfg, data, pad_id, rank, world, wmod)
    meta_stream = (BatchStream(meta_ex, cfg.meta.meta_batch_size, pad_id, rank, world, cfg.train.seed + 1,
                               collate_fn=collate_fn(cfg)) if bilevel else None)
    n_train = sum(p.numel() if eng.stage != 3 else p.ds_numel for p in eng.params)
    print0(f"ranks {world}, ZeRO stage {eng.stage}, {cfg.train.precision}, mode {cfg.model.mode}: "
           f"{n_train:,} trainable parameters; weights {cfg.meta.weights if bilevel else 'uniform (baseline)'}"
           f"{', hypergradient ' + cfg.meta.hypergrad if bilevel else ''}", rank=rank)
    if cfg.run.dry_run:
        print0("dry run: config, data and model are valid; exiting before training", rank=rank)
        return 0

    start = 0
    names = [s.name for s in data.train_sources]
    source_of = torch.tensor(data.source_of, dtype=torch.long)
    src_base = torch.zeros(len(names), 3, dtype=torch.float64)  # totals before this process: n, loss, weight
    src_total = torch.zeros_like(src_base)  # this process, this rank
    if resume is not None:
        shared, per_rank, saved_world = engine.load_checkpoint(eng, resume, universal)
        wmod.load_state_dict(shared["weights"])
        wopt.load_state_dict(shared["weights_opt"])
        moved = saved_world != world  # data: the same fraction of the epoch, split anew (BatchStream)
        train_stream.load_state_dict(per_rank["train_stream"], allow_world_change=moved)
        if meta_stream is not None:
            meta_stream.load_state_dict(per_rank["meta_stream"], allow_world_change=moved)
        start = shared["step"]
        src_base = torch.tensor(shared.get("source_totals", src_base.tolist()), dtype=torch.float64)
        print0(f"resumed from {resume} at update {start}", rank=rank)
        if moved:
            print0(f"the checkpoint was written by {saved_world} ranks, this run has {world}: parameters and "
                   f"optimizer state {'via ' + str(universal) if universal else 'loaded whole (ZeRO stage 0)'}; "
                   "the data continues at the same fraction of the epoch, split over the new ranks (within this "
                   "epoch some examples are seen twice or not at all; later epochs are as a run on "
                   f"{world} ranks)", rank=rank)
        if universal is not None:
            dist.barrier()
            if rank == 0:  # derived from the checkpoint, needed no more
                err = ckpt.remove_tree(universal.parent)
                if err:
                    print(f"dreamprm: warning: {err}", file=sys.stderr, flush=True)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        note = truncate_metrics(run_dir / "metrics.jsonl", start)
        if note:
            print0(note, rank=rank)
    dist.barrier()

    if dist.all_reduce_(torch.tensor([float(stop.signum)])).item() > 0:
        if rank == 0:
            write_status(run_dir, {"state": "stopped", "step": start})
        print0(f"stopped by signal during startup at update {start}", rank=rank)
        return 128 + (stop.signum or signal.SIGTERM)
    wb = start_wandb(cfg, run_dir, rank)
    status = {"state": "running", "step": start, "total_steps": cfg.train.total_steps,
              "last_checkpoint": str(resume) if resume is not None else None}

    def checkpoint(step):
        totals = src_base + dist.all_reduce_(src_total.clone())
        path, notes = engine.save_checkpoint(
            eng, ckpt_root, step,
            shared={"config": cfg.to_dict(), "weights": wmod.state_dict(), "weights_opt": wopt.state_dict(),
                    "profiles": {n: dataclasses.asdict(p) for n, p in data.profiles.items()},
                    "source_totals": totals.tolist()},
            per_rank={"train_stream": train_stream.state_dict(),
                      "meta_stream": meta_stream.state_dict() if meta_stream else {}},
            keep_last=cfg.run.keep_last, parent=Path(status["last_checkpoint"] or "").name or None,
            keep=[resume] if resume is not None else [])
        for n in notes:  # old checkpoints that could not be deleted: the run goes on, the disk fills
            print(f"dreamprm: warning: {n}", file=sys.stderr, flush=True)
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
    src_window = torch.zeros_like(src_total)
    try:
        for step in range(start + 1, cfg.train.total_steps + 1):
            meta_step = bilevel and step > cfg.meta.meta_warmup and step % cfg.meta.meta_interval == 0
            fused = meta_step and cfg.meta.hypergrad == "fused"
            pre = fused_meta_gradient(eng, next(meta_stream), cfg) if fused else None  # v before the update
            # --mix learned: the domain weights sample the batches, so the loss weights are 1
            out = engine.inner_update(eng, train_stream, wmod, cfg.meta.baseline or learned_mix, step,
                                      tap=pre["tap"] if fused else None)
            for r in out["recent"]:
                last_w[r["batch"]["index"].cpu()] = r["weights"].cpu().float()
                vals = torch.stack([torch.ones(len(r["weights"])), r["features"][:, 0].cpu().float(),
                                    r["weights"].cpu().float()], 1).double()  # n, loss, weight
                src_window.index_add_(0, source_of[r["batch"]["index"].cpu()], vals)
                src_total.index_add_(0, source_of[r["batch"]["index"].cpu()], vals)
            window["n"] += 1
            window["tokens"] += out["tokens"]
            tokens_total += out["tokens"]
            window["loss"] += out["loss"]
            window["loss_unweighted"] += out["loss_unweighted"]
            if meta_step:
                meta = meta_update(eng, None if fused else next(meta_stream), out["recent"], wmod, wopt, cfg, step,
                                   fused=pre)
                pre = None  # v's shards are not needed after the weight step
                if learned_mix:  # the next batches are drawn with the updated domain weights
                    train_stream.set_probs(source_probs(cfg, data, wmod))
                window["meta_n"] += 1
                window["meta_loss"] += meta["meta_loss"]
            # periodic evaluation: every rank takes part; its metrics get a row of their own
            evals = run_eval(eng, eval_ex, cfg) if eval_ex and step % cfg.run.eval_every == 0 else {}
            if step % log_every == 0 or step == cfg.train.total_steps or evals:
                row = {**log_row(step, window, meta, eng, wmod, wopt, cfg, time.perf_counter() - t_last),
                       **source_row(names, dist.all_reduce_(src_window), train_stream), **evals}
                t_last = time.perf_counter()
                window = dict.fromkeys(window, 0)
                src_window = torch.zeros_like(src_window)
                if rank == 0:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if wb is not None:
                        wb.log(row, step=step)
                    if bar is not None and bar.disable:
                        print0(progress_line(row, cfg.train.total_steps, step - start,
                                             time.perf_counter() - t_start))
                    status.update(step=step, loss=row["loss"], meta_loss=row.get("meta_loss"))
                    write_status(run_dir, status)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", meta=f"{meta.get('meta_loss', math.nan):.4f}")
            stopping = dist.all_reduce_(torch.tensor([float(stop.signum)])).item() > 0
            if step % cfg.run.save_every == 0 or step == cfg.train.total_steps or stopping:
                checkpoint(step)
            if stopping:
                print0(f"stopped by signal at update {step}; checkpoint {status['last_checkpoint']}. "
                       "Run the same command again to resume.", rank=rank)
                status["state"] = "stopped"
                return 128 + (stop.signum or signal.SIGTERM)
        status["state"] = "finished"
        dump_instance_weights(wmod, train_ex, last_w, run_dir, rank, cfg.meta.baseline, domains)
        summary = source_row(names, src_base + dist.all_reduce_(src_total.clone()), train_stream)
        status["sources"] = summary
        if wb is not None:
            wb.summary.update(summary)
        print0("per source over the run: " + ", ".join(
            f"{n}: {summary[f'src/{n}/n']:.0f} instances, loss {summary.get(f'src/{n}/loss', math.nan):.4f}, "
            f"weight {summary.get(f'src/{n}/w', math.nan):.3f}" for n in names), rank=rank)
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
        if dist.collective_failed(e):  # a lost node or a hung rank: name it, then stop
            err = CollectiveError(collective_message(e, dist.silent_ranks(min(60, cfg.run.collective_timeout)),
                                                     cfg.run.collective_timeout, step, status["last_checkpoint"]))
            status.update(state="failed", error=str(err))
            raise err from e
        status.update(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if bar is not None:
            bar.close()
        if rank == 0 and run_dir.is_dir():
            status["step"] = step
            write_status(run_dir, status)
        if wb is not None:
            wb.finish()


def collective_message(e: BaseException, silent: list[int] | None, timeout_s: int, step: int,
                       last_checkpoint: str | None) -> str:
    """silent: the ranks a monitored barrier found missing (dist.silent_ranks), None if unknown."""
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if silent:
        who = f"rank {', '.join(map(str, silent))} went silent"
    elif "timed out" in text.lower():
        who = "a rank or node went silent"
    else:
        who = "a rank died or a node was lost (a peer closed its connection)"
    return (f"{who}: a collective at update {step} failed ({text}; --collective_timeout {timeout_s} s). The job "
            f"stops here; run it again (resubmit) to resume from {last_checkpoint or 'the start (no checkpoint yet)'}")


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


def dump_instance_weights(wmod, train_ex, last_w: torch.Tensor, run_dir: Path, rank: int, baseline: bool,
                          domains: list[str]):
    """instance_weights.jsonl: the learned weight of every training record, by id, with its
    domain by name (null for a record without one).

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
    rows = [{"id": ex.id, "index": ex.index, "domain": domains[ex.domain] if ex.domain else None,  # 0: none
             "weight": None if math.isnan(wi) else wi} for ex, wi in zip(train_ex, w.tolist())]
    ckpt.write_text_atomic(run_dir / "instance_weights.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
