"""Checkpoints through the engine: writing, verifying, converting and loading, every rank agreeing.

File names, the manifest, verification and pruning live in dreamprm/checkpoint.py (no deepspeed);
here is what needs the DeepSpeed engine or the process group. A failure on any rank is reported
on every rank (_on_every_rank), so no rank is left waiting in the next collective.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt
from dreamprm import dist
from dreamprm.engine.core import Engine, get_fp32_state_dict_from_zero_checkpoint
from dreamprm.errors import CheckpointError


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _on_every_rank(fn, folder: Path):
    """Run fn here; returns (its result, the failures of all ranks) so that every rank raises
    together instead of leaving the others waiting in the next collective."""
    result, err = None, None
    try:
        result = fn()
    except (OSError, RuntimeError) as e:  # torch's C++ file writer raises RuntimeError
        err = f"rank {dist.rank_world()[0]}: {ckpt.write_problem(e, folder)}"
    return result, [e for e in dist.all_gather_object(err) if e]


def save_checkpoint(eng: Engine, root: Path, step: int, shared: dict, per_rank: dict, keep_last: int,
                    parent: str | None = None, keep=(), exclude_frozen: bool = False) -> tuple[Path, list[str]]:
    """Write a checkpoint atomically: into <tag>.tmp, manifest (sizes and SHA-256) last,
    rename, then `latest`, then prune the lineage (checkpoint.prune; keep: never deleted).

    shared (rank 0's copy is written) holds the weight module, its optimizer, the config;
    per_rank holds the data positions; the RNG state is added here. parent: the checkpoint
    this one continues from. exclude_frozen: leave out the parameters that do not train (a LoRA
    run's base, rebuilt from its folder on loading; shared should then record that folder's
    fingerprint, model.base_fingerprint). Returns the folder and messages about old checkpoints that
    could not be deleted. A failed write (disk full, read-only, no permission) on any rank
    removes the partial folder and raises CheckpointError on every rank naming the cause and
    the last complete checkpoint.
    """
    name = ckpt.tag(step)
    folder = ckpt.AtomicFolder(root / name, tmp=root / f"{name}.tmp")  # remove_partial finds step_*.tmp
    tmp = folder.tmp

    def fail(errors):  # errors: "rank R: cause" of every rank that failed
        if eng.rank == 0:
            folder.abort()
        last = ckpt.latest(root) if (root / ckpt.LATEST).is_file() else None
        ranks = ", ".join(e.split(":", 1)[0].removeprefix("rank ") for e in errors)
        raise CheckpointError(f"{errors[0].split(': ', 1)[1]} while writing checkpoint {name} in {root} "
                              f"(rank {ranks}); the partial folder was removed; the last complete checkpoint "
                              f"is {last.name if last else 'none (nothing to resume from)'}")

    def prepare():
        if eng.rank == 0:
            folder.begin()

    def write():
        eng.ds.save_checkpoint(str(root), tag=tmp.name, save_latest=False, exclude_frozen_parameters=exclude_frozen)
        torch.save({**per_rank, "rng": _rng_state()}, tmp / ckpt.rank_file(eng.rank))
        if eng.rank == 0:
            torch.save({**shared, "step": step, "world": eng.world, "stage": eng.stage}, tmp / ckpt.SHARED_STATE)

    def describe():  # each rank reads a share of the files (cost per GB: bench/checksum.py)
        return ckpt.describe_files(tmp, ckpt.list_files(tmp)[eng.rank::eng.world])

    for fn in (prepare, write):
        _, errors = _on_every_rank(fn, root)
        if errors:
            fail(errors)
    mine, errors = _on_every_rank(describe, root)
    if errors:
        fail(errors)
    files = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}

    def publish():
        if eng.rank != 0:
            return []
        ckpt.write_manifest(tmp, step, eng.world, eng.stage, parent, files)
        final = folder.commit()  # replaces the same step of an earlier (rolled back) history
        ckpt.write_latest(root, name)
        return ckpt.prune(root, final, keep_last, keep)
    notes, errors = _on_every_rank(publish, root)
    if errors:
        fail(errors)
    return folder.final, notes or []


def verify_on_every_rank(path: Path) -> tuple[dict | None, list[str]]:
    """Check a checkpoint with every rank reading a share of the checksums; returns (manifest,
    problems), the same on every rank. Problems are empty for an intact checkpoint."""
    try:
        man = ckpt.read_manifest(path)
    except CheckpointError as e:
        return None, [str(e)]
    rank, world = dist.rank_world()
    bad = sorted({b for part in dist.all_gather_object(ckpt.file_problems(path, man, rank, world)) for b in part})
    return man, ([str(ckpt.damaged_error(path, bad))] if bad else [])


def universal_copy(path: Path, world: int, rank: int) -> Path | None:
    """For a checkpoint of another world size, its DeepSpeed universal form (per-parameter
    fp32 weights and Adam moments, independent of the rank count), written by rank 0 next to
    the checkpoints as universal/<tag> and loaded through the engine (create_engine with
    load_universal). None when the checkpoint loads as it is: same world, or ZeRO stage 0,
    whose model states file holds the whole optimizer. The other ranks wait meanwhile."""
    man = ckpt.read_manifest(path)
    if man["world"] == world or man["stage"] == 0:
        return None
    out = path.parent / "universal" / path.name
    err = None
    if rank == 0:  # always afresh: a leftover may come from an older checkpoint of the same name
        folder = ckpt.AtomicFolder(out, tmp=out.with_name(out.name + ".tmp"))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(folder.tmp), "--num_extract_workers", "2", "--num_merge_workers", "2"]
        if man["stage"] < 3:  # ZeRO-1/2 checkpoints lack the Megatron-style layout info it asks for
            cmd.append("--inject_missing_state")
        try:
            folder.begin()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                folder.commit()
            else:
                err = (f"could not convert {path} (written by {man['world']} ranks, ZeRO stage {man['stage']}) "
                       f"for {world} ranks: {' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2000:]}\nresume on "
                       f"{man['world']} ranks instead")
                folder.abort()
        except OSError as e:
            err = str(e)
    err = dist.broadcast_object(err)
    if err:
        raise CheckpointError(err)
    return out


def load_checkpoint(eng: Engine, path: Path, universal: Path | None = None) -> tuple[dict, dict, int]:
    """Load a checkpoint that verify_on_every_rank passed into the engine (from its universal
    form when given); returns the shared state, this rank's data positions and the world size
    that wrote it. The RNG state is restored here; a rank the checkpoint did not have takes
    that of rank (rank mod old world)."""
    man = ckpt.read_manifest(path)
    if man["world"] != eng.world and man["stage"] > 0 and universal is None:
        raise CheckpointError(f"{path} was written by {man['world']} ranks, this run has {eng.world}: load it "
                              "through universal_copy")
    src = universal or path
    loaded, _ = eng.ds.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True, custom_load_fn=_load_module)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {src}")
    shared = ckpt.shared_state(path)
    per_rank = torch.load(path / ckpt.rank_file(eng.rank % man["world"]), weights_only=True)
    _set_rng_state(per_rank["rng"])
    return shared, per_rank, man["world"]


def _load_module(src: dict, dst: torch.nn.Module) -> None:
    """The engine's module from a checkpoint's state dict (DeepSpeed's custom_load_fn). A checkpoint
    saved with exclude_frozen lacks the frozen parameters, which the engine already holds from the
    base folder; any other missing or unexpected key is an error, as in a strict load."""
    res = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = sorted(set(res.missing_keys) - frozen)
    if missing or res.unexpected_keys:
        raise CheckpointError(f"the checkpoint does not fit the model this run builds: missing {missing[:5]}, "
                              f"unexpected {sorted(res.unexpected_keys)[:5]}")


def consolidated_state_dict(path: Path) -> dict:
    """The full fp32 state dict of the PRM module in a checkpoint, for any ZeRO stage.

    Keys are the training module's (peft names under LoRA). A checkpoint saved with exclude_frozen
    holds only the trained parameters (and buffers). Verifies completeness first.
    """
    man = ckpt.verify(path)
    if man["stage"] >= 2:
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    states = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}
