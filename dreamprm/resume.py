"""Every resume decision, in the order a job takes them.

    apply_resume_step(cfg)        --resume_step N turned into --resume_from (the pre-flight checks call it)
    base_fingerprint(cfg, ...)    a LoRA run's base folder fingerprinted once (its checkpoints hold no base)
    choose(cfg, rank, world, base)  partial saves removed; the checkpoint to resume from picked and verified
                                  (--resume_from auto: the newest intact one of the run's lineage, saying
                                  which it passed over and why); its config checked against this run's, its
                                  base fingerprint against the base folder's now, its ZeRO stage against
                                  this run's; for another number of ranks, its DeepSpeed universal form made
    check_data(data, resume)      the data read now has as many examples per source as the checkpoint's streams
    resolve_epochs(cfg, ...)      --epochs N turned into total_steps once the data is read; a resumed run with
                                  the same --epochs keeps its checkpoint's (kept_total_steps)
    restore(eng, state, ...)      the engine, the TrainState and the RNG put back where the checkpoint was
                                  (--weights_from: the weights it gives now checked against those trained with)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt
from dreamprm import dist, engine
from dreamprm.config import CHECKPOINTS_DIR, Config
from dreamprm.errors import CheckpointError
from dreamprm.model import base_mismatch, checkpoint_holds_base, model_dir
from dreamprm.model import base_fingerprint as folder_fingerprint
from dreamprm.runlog import print0

# Fields that must agree between a checkpoint and the run resuming it: what the parameters mean (model,
# adapters, precision, the weight module), how text is encoded (profiles, templates, step tag, length),
# the loss they were trained under, and the data and its order (sources, batches, seed).
RESUME_MUST_MATCH = [("data", "train_file"), ("data", "meta_file"), ("data", "train_format"), ("data", "meta_format"),
                     ("data", "max_length"), ("data", "mix"), ("data", "mix_alpha"), ("data", "curriculum"),
                     ("data", "curriculum_start"), ("data", "curriculum_steps"), ("data", "curriculum_schedule"),
                     ("data", "profile"),
                     ("data", "system_prompt"), ("data", "prompt_template"),
                     ("model", "name_or_path"), ("model", "mode"), ("model", "lora_r"), ("model", "lora_alpha"),
                     ("model", "lora_dropout"), ("model", "lora_targets"), ("model", "step_tag"),
                     ("model", "add_step_tag"), ("model", "chat_template"), ("model", "trust_remote_code"),
                     ("train", "precision"), ("train", "step_loss"), ("train", "hard_labels"),
                     ("train", "focal_gamma"), ("train", "pos_fraction"),
                     ("train", "batch_size"), ("train", "grad_accum"), ("train", "seed"),
                     ("meta", "weights"), ("meta", "baseline"), ("meta", "table_optimizer"), ("meta", "net_hidden"),
                     ("meta", "weights_from"), ("meta", "unmatched_weight")]
# Fields whose value a resumed run takes from the checkpoint's optimizer and scheduler state (the
# learning rates, weight decay and the schedule's shape): a new value would not take effect, so it is refused.
RESUME_FROM_STATE = [("train", "lr"), ("train", "weight_decay"), ("train", "lr_schedule"), ("train", "warmup_steps"),
                     ("meta", "meta_lr")]

def apply_resume_step(cfg: Config) -> list[str]:
    """--resume_step N: with --resume_from auto, resume from output_dir's checkpoint of step N (set here as
    cfg.run.resume_from); with a --resume_from folder, check that it is that step. Problems, for the
    pre-flight checks to report with the others."""
    r, n = cfg.run, cfg.run.resume_step
    if not n or r.resume_from == "none":  # off, or contradicting --resume_from none (config.validate says so)
        return []
    if r.resume_from != "auto":
        if ckpt.step_of(Path(r.resume_from).name) != n:
            return [f"--resume_step {n}: --resume_from {r.resume_from} is not the checkpoint of step {n}; "
                    "pass one of the two"]
        return []
    root = Path(r.output_dir) / CHECKPOINTS_DIR
    found = sorted(p for p in root.glob("step_*") if p.is_dir() and ckpt.step_of(p.name) is not None)
    match = [p for p in found if ckpt.step_of(p.name) == n]
    if not match:
        have = ", ".join(str(ckpt.step_of(p.name)) for p in found) or "none"
        return [f"--resume_step {n}: {root} has no checkpoint of step {n} (steps there: {have})"]
    r.resume_from = str(match[0])
    return []


def resolve_resume(cfg: Config, ckpt_root: Path, problems_of=None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes about the ones passed over.

    --resume_from auto: `latest`, else the newest intact checkpoint of its lineage, saying why
    (checkpoint.resume_candidates: `latest` is a hint, a damaged or stale one is passed over with a note);
    a named checkpoint is used as it is or refused.
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
        if (ckpt_root / ckpt.LATEST).exists() or ckpt.complete(ckpt_root):
            raise CheckpointError(f"--resume_from none but {ckpt_root} holds checkpoints; pick another "
                                  "--output_dir, delete them, or resume with --resume_from auto")
        return None, []
    if r != "auto":
        problems = problems_of(Path(r))
        if problems:
            raise CheckpointError(problems[0])
        return Path(r), []
    cands, notes = ckpt.resume_candidates(ckpt_root)
    for cand in cands:
        problems = problems_of(cand)
        if not problems:
            return cand, notes
        notes.append(f"{problems[0]}; trying the previous checkpoint of this run")
    if notes:
        raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(notes)
                              + f"\nstart a new run (another --output_dir, or --resume_from none after "
                              f"moving {ckpt_root} away)")
    return None, []


def check_resume_config(cfg: Config, saved: dict) -> None:
    """CheckpointError naming every flag of RESUME_MUST_MATCH and RESUME_FROM_STATE whose value differs from
    the checkpoint's config. Called before anything of the checkpoint is loaded."""
    default = Config()  # an option the checkpoint predates had its default value then

    def was(s, k):
        return (saved.get(s) or {}).get(k, getattr(getattr(default, s), k))

    def differs(fields):
        now = [(k, was(s, k), getattr(getattr(cfg, s), k)) for s, k in fields]
        return [(k, old, new) for k, old, new in now if old != new]

    diff = [f"--{k}: checkpoint has {old!r}, this run {new!r}" for k, old, new in differs(RESUME_MUST_MATCH)]
    diff += [f"--{k}: checkpoint has {old!r}, this run {new!r} (a resumed run takes it from the checkpoint's "
             "optimizer and scheduler state: the new value would not take effect)"
             for k, old, new in differs(RESUME_FROM_STATE)]
    if diff:
        raise CheckpointError("cannot resume: the run config differs from the checkpoint's:\n  "
                              + "\n  ".join(diff) + "\nuse the checkpoint's values (its config.yaml), or start a "
                              "new run in another --output_dir")


def check_stage(cfg: Config, resume: Path, world: int) -> None:
    """A checkpoint resumes only under the ZeRO stage that wrote it: DeepSpeed lays the optimizer state out per
    stage (whole at 0, flat partitions at 1/2, per-parameter shards at 3); a stage-0 checkpoint under stage 3 ends
    in its bare AssertionError. A manifest without a stage is not compared."""
    saved = ckpt.read_manifest(resume).get("stage")
    now = engine.ds_config(cfg, world)["zero_optimization"].get("stage", 0)
    if saved is None or saved == now:
        return
    old = (ckpt.shared_state(resume)["config"].get("train") or {}).get("deepspeed") or "none"
    raise CheckpointError(f"cannot resume from {resume}: --deepspeed {cfg.train.deepspeed or 'none'} gives ZeRO "
                          f"stage {now}, but the checkpoint was written under stage {saved} (--deepspeed {old}); a "
                          f"checkpoint resumes only under its own stage. Resume with a --deepspeed JSON of stage "
                          f"{saved}{' (or none)' if saved == 0 else ''}, or start a new run in another --output_dir "
                          "(`dreamprm export` keeps this run's PRM)")


def check_data(data, resume: Path) -> None:
    """The data read now (data: sources.RunData) against the sizes the checkpoint's streams were built on (rank 0's
    stream state: n, or a mixture's per-source sizes): a stream position means nothing in data of another size (a
    file edited under the same path, --skip_invalid dropping other records). Before the model is built."""
    saved = torch.load(resume / ckpt.rank_file(0), weights_only=True)
    train, meta = saved.get("train_stream") or {}, saved.get("meta_stream") or {}
    sizes = [data.source_of.count(k) for k in range(len(data.train_sources))]
    diff = []
    if "sizes" in train and train["sizes"] != sizes:  # a mixture: one stream per source
        diff += [(s.where(), old, new) for s, old, new in zip(data.train_sources, train["sizes"], sizes) if old != new]
    elif "n" in train and train["n"] != len(data.train_ex):
        diff.append((", ".join(s.where() for s in data.train_sources), train["n"], len(data.train_ex)))
    if "n" in meta and meta["n"] != len(data.meta_ex):
        diff.append((", ".join(s.where() for s in data.meta_sources), meta["n"], len(data.meta_ex)))
    if diff:
        raise CheckpointError(f"cannot resume from {resume}: the data differs from the run's:\n  "
                              + "\n  ".join(f"{where}: {old} examples in the checkpoint's run, {new} now"
                                             for where, old, new in diff)
                              + "\nthe files changed since the run started (records added or removed, or "
                              "--skip_invalid dropping others); resume with the same data, or start a new run "
                              "in another --output_dir")


def check_transferred(state, shared: dict, resume: Path) -> None:
    """--weights_from: the transferred weights are part of the run's identity. The same flag can give other weights
    when the file changed since the run started (the proxy run resumed, the data edited): refused, not mixed."""
    w = getattr(state.wmod, "w", None)
    if w is None:
        return
    saved = shared["weights"].get("w")
    if saved is None or saved.shape != w.shape or not torch.equal(saved, w):
        n = "all" if saved is None or saved.shape != w.shape else int((saved != w).sum())
        raise CheckpointError(f"cannot resume from {resume}: --weights_from now gives other "
                              f"weights than the run trained with ({n} of {len(w)} training examples differ): the "
                              "weights file changed since the run started; restore it, or start a new --output_dir")


def base_fingerprint(cfg: Config, rank: int, world: int) -> dict | None:
    """The fingerprint of the run's base model folder (model.base_fingerprint; every rank hashes a share
    of its files), taken once when the run starts: each checkpoint records it, a resume compares it.
    None when the checkpoints hold the whole model (model.checkpoint_holds_base) and for a dry run."""
    if cfg.run.dry_run or checkpoint_holds_base(cfg.model):
        return None
    parts = dist.all_gather_object(folder_fingerprint(model_dir(cfg.model), rank, world))
    return {"path": parts[0]["path"], "files": {k: v for part in parts for k, v in part["files"].items()}}


def check_base(recorded: dict | None, base: dict | None, resume: Path) -> None:
    """A checkpoint without its base (recorded: the fingerprint it holds) resumes only on the same base
    files. Checkpoints that hold the whole model record none."""
    msg = base_mismatch(recorded, base, f"cannot resume from {resume}") if recorded and base else None
    if msg:
        raise CheckpointError(msg)


def find_resume(cfg: Config, ckpt_root: Path, rank: int, base: dict | None = None) -> Path | None:
    """Before the model is built: partial saves removed, the checkpoint to resume from chosen
    and verified (every rank reads a share of the checksums), its config checked, and its base
    fingerprint against base (this run's, base_fingerprint)."""
    if rank == 0 and ckpt_root.is_dir():
        for n in ckpt.remove_partial(ckpt_root):
            print0(n, rank=rank)
    dist.barrier()
    resume, notes = resolve_resume(cfg, ckpt_root, lambda p: engine.verify_on_every_rank(p)[1])
    for n in notes:
        print0(n, rank=rank)
    if resume is not None:
        shared = ckpt.shared_state(resume)
        check_resume_config(cfg, shared["config"])
        check_base(shared.get("base"), base, resume)
        if notes:
            print0(f"falling back to {resume}, the newest intact checkpoint of this run", rank=rank)
    return resume


def choose(cfg: Config, rank: int, world: int, base: dict | None = None) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume from or None, its universal form when the world size changed, else None).
    base: this run's base fingerprint (base_fingerprint)."""
    if cfg.run.dry_run:
        return None, None
    resume = find_resume(cfg, Path(cfg.run.output_dir) / CHECKPOINTS_DIR, rank, base)
    if resume is not None:
        check_stage(cfg, resume, world)
    universal = engine.universal_copy(resume, world, rank) if resume is not None else None
    return resume, universal


def restore(eng, state, resume: Path, universal: Path | None, rank: int, world: int) -> None:
    """Load the checkpoint into the engine and the TrainState (every rank); the universal form, derived
    from the checkpoint, is deleted afterwards."""
    shared, per_rank, saved_world = engine.load_checkpoint(eng, resume, universal)
    check_transferred(state, shared, resume)
    moved = saved_world != world
    state.load_state_dict(shared, per_rank, world_changed=moved)
    print0(f"resumed from {resume} at update {state.step}", rank=rank)
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


def kept_total_steps(cfg: Config, resumed_from: Path) -> int | None:
    """The total_steps a run resumed from this checkpoint keeps: the one resolved when the run started, if
    --epochs is the same (another number of ranks would give another one); None: resolved again."""
    saved = ckpt.shared_state(resumed_from)["config"]["train"]
    return saved["total_steps"] if saved.get("epochs") == cfg.train.epochs else None


def resolve_epochs(cfg: Config, examples: int, world: int, resumed_from: Path | None) -> list[str]:
    """--epochs N -> cfg.train.total_steps = ceil(N x examples / examples per update), examples being those kept
    after cuts and drops; resolved once (kept_total_steps). config.yaml records both. Returns the notes to print."""
    t = cfg.train
    kept = kept_total_steps(cfg, resumed_from) if resumed_from is not None else None
    if kept is not None:
        t.total_steps = kept
        notes = [f"--epochs {t.epochs:g}: total_steps {t.total_steps}, as resolved when the run started"]
    else:
        per_update = t.batch_size * t.grad_accum * world
        t.total_steps = max(1, math.ceil(t.epochs * examples / per_update))
        notes = [f"--epochs {t.epochs:g}: {examples} training examples, {per_update} per update (batch_size "
                 f"{t.batch_size} x grad_accum {t.grad_accum} x {world} ranks) -> total_steps {t.total_steps}"]
    if t.warmup_steps >= t.total_steps:
        notes.append(f"warning: --warmup_steps {t.warmup_steps} >= total_steps {t.total_steps}: the learning rate "
                     f"never reaches --lr {t.lr:g}; lower --warmup_steps")
    return notes
