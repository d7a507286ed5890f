"""Every resume decision, in the order a job takes them.

    base_fingerprint(cfg, ...)    a LoRA run's base folder fingerprinted once (its checkpoints hold no base)
    choose(cfg, rank, world, base)  partial saves removed; the checkpoint to resume from picked and verified
                                  (--resume_from auto: the newest intact one of the run's lineage, saying
                                  which it passed over and why); its config checked against this run's, its
                                  base fingerprint against the base folder's now;
                                  for another number of ranks, its DeepSpeed universal form made
    restore(eng, state, ...)      the engine, the TrainState and the RNG put back where the checkpoint was

--resume_step N is turned into --resume_from by the pre-flight checks (preflight.apply_resume_step).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dreamprm import checkpoint as ckpt
from dreamprm import dist, engine
from dreamprm.config import Config
from dreamprm.errors import CheckpointError
from dreamprm.model import base_mismatch, checkpoint_holds_base, model_dir
from dreamprm.model import base_fingerprint as folder_fingerprint

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


def check_resume_config(cfg: Config, saved: dict) -> None:
    default = Config()  # an option the checkpoint predates had its default value then

    def was(s, k):
        return saved.get(s, {}).get(k, getattr(getattr(default, s), k))

    diff = [f"--{k}: checkpoint has {was(s, k)!r}, this run {getattr(getattr(cfg, s), k)!r}"
            for s, k in RESUME_MUST_MATCH if was(s, k) != getattr(getattr(cfg, s), k)]
    if diff:
        raise CheckpointError("cannot resume: the run config differs from the checkpoint's:\n  "
                              + "\n  ".join(diff) + "\nuse the same settings or a new --output_dir")


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
    resume = find_resume(cfg, Path(cfg.run.output_dir) / "checkpoints", rank, base)
    universal = engine.universal_copy(resume, world, rank) if resume is not None else None
    return resume, universal


def restore(eng, state, resume: Path, universal: Path | None, rank: int, world: int) -> None:
    """Load the checkpoint into the engine and the TrainState (every rank); the universal form, derived
    from the checkpoint, is deleted afterwards."""
    shared, per_rank, saved_world = engine.load_checkpoint(eng, resume, universal)
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
