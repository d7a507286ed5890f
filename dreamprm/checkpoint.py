"""Checkpoint files without DeepSpeed: names, the manifest, verification, `latest`, pruning.

A checkpoint is a folder RUN/checkpoints/step_NNNNNNNN written by engine.save_checkpoint into
step_N.tmp and renamed when whole. Its MANIFEST.json, written last, lists every file with its
size and SHA-256 and names the checkpoint it continues from ("parent"): following parents from
the checkpoint resume starts at gives the run's current lineage, which is what resume falls back
along and what pruning thins. `latest` is a hint to where that start is (resume_candidates).
Everything here is plain Python (plus torch for the file formats), so export, scoring and
slurm/preflight.py read checkpoints without importing deepspeed.

Also here: the one atomic writer (temp file, fsync, rename, fsync of the folder) used for every
JSON/YAML/text file the run writes, its folder counterpart AtomicFolder (checkpoints, their
universal form, exports, the SmolLM2 folder), and the wording of OS errors (disk full, read-only, no
permission) that every writer reports.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from dreamprm.errors import CheckpointError

MANIFEST = "MANIFEST.json"
SHARED_STATE = "dreamprm_state.pt"  # weight module, its optimizer, the config (rank 0's copy)
LATEST = "latest"
HASH = "sha256"
MANIFEST_FORMAT = 2  # 1: sizes only (no checksums, no parent)
_TAG = re.compile(r"step_(\d+)")
_RANK_FILE = re.compile(r"dreamprm_rank(\d+)\.pt")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The update number of a complete checkpoint's folder name, None for anything else."""
    m = _TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    return f"dreamprm_rank{rank:05d}.pt"


# ---------------------------------------------------------------- writing


def os_problem(e: BaseException) -> str:
    """A short cause for a failed write: 'disk full', 'read-only file system', ..."""
    code = getattr(e, "errno", None)
    return {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted (an immutable folder? lsattr -d shows it, chattr -i clears it)"
            }.get(code, f"{type(e).__name__}: {e}")


def write_problem(e: BaseException, folder: Path) -> str:
    """os_problem, also for writers that lose the errno (torch's C++ writer raises
    RuntimeError): then the file system of folder says whether it is full or read-only."""
    if isinstance(e, OSError) and e.errno:
        return os_problem(e)
    try:
        st = os.statvfs(folder)
    except OSError:
        return f"{type(e).__name__}: {e}"
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if st.f_bavail * st.f_frsize < 64 << 20:  # under 64 MiB left after a failed write
        return "disk full"
    try:  # no permission, an immutable folder: torch then says "parent directory does not exist"
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as probe:
        return f"{os_problem(probe)}: {folder}"
    return f"{type(e).__name__}: {e}"


def _path_problem(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOENT:
        return f"the folder {path.parent} does not exist"
    if e.errno == errno.EISDIR:
        return "it is a directory; name a file"
    if e.errno == errno.ENOTDIR:
        return f"{path.parent} is not a folder"
    return os_problem(e)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace path with data (str: UTF-8) whole or not at all: a temp file in the same folder created
    0666 & ~umask (the usual permissions; mkstemp's would be 0600), fsync, rename, fsync the folder.

    On any failure (a signal included) the temp file is removed and an old file at path is left as it
    was; the OSError raised names the file and the cause (its strerror is the whole message)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {_path_problem(e, path)}") from e
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def fsync_dir(path: Path) -> None:
    """Make a rename in path durable (a crash after it cannot bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFolder:
    """A folder that appears whole or not at all: written under a temporary name, then renamed.

    begin() removes a leftover temporary folder and makes it afresh; commit() replaces the final
    folder whole (whatever it held is deleted) and fsyncs the parent; publish() is commit() for builders
    racing to make the same folder: the first one in place stays; abort() removes the temporary
    folder. A failed removal raises OSError naming what could not be deleted. As a context manager
    (one process): begin on entry, commit on success, abort on any exception. A checkpoint save
    calls the steps itself, because every rank writes into the folder between begin and commit.
    tmp: the temporary folder (default .<name>.tmp-<pid> next to the final one).
    """

    def __init__(self, final: Path, tmp: Path | None = None):
        self.final = Path(final)
        self.tmp = Path(tmp) if tmp is not None else self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

    def begin(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_or_raise(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        _remove_or_raise(self.final)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def publish(self) -> Path:
        """The temporary folder renamed into place unless a final folder with files is there first (it may be
        in use, so it is kept): then OSError, as rename raises it."""
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # best effort: the error being handled matters more

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _remove_or_raise(path: Path) -> None:
    err = remove_tree(path) if path.exists() else None
    if err:
        raise OSError(err)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (hashlib releases the GIL on them)."""
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Every file under folder except the manifest, relative, sorted: the same on every rank."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def describe_files(folder: Path, names: list[str]) -> dict:
    """Manifest entries (size and checksum) of the given files of folder."""
    return {n: {"bytes": (folder / n).stat().st_size, HASH: file_digest(folder / n)} for n in names}


def write_manifest(folder: Path, step: int, world: int, stage: int, parent: str | None, files: dict) -> None:
    write_json_atomic(folder / MANIFEST, {"format": MANIFEST_FORMAT, "step": step, "world": world, "stage": stage,
                                          "parent": parent, "files": dict(sorted(files.items()))})


def manifest_id(ckpt: Path) -> str:
    """What identifies a complete checkpoint: the first 16 hex digits of its manifest's SHA-256 (the manifest
    holds every file's checksum, so a folder of the same name rewritten by another history has another)."""
    return hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()[:16]


def write_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST, name + "\n")


# ---------------------------------------------------------------- reading and verifying


def read_manifest(ckpt: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointError if the folder is missing or partial, or the
    manifest's own step, parent or world do not fit the folder it sits in (copied from another checkpoint)."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MANIFEST}: the save was interrupted); "
                              f"resume from an earlier one with --resume_from, or delete it")
    try:
        man = json.loads(path.read_text())
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ValueError("no file list")
        for name, entry in man["files"].items():
            if not (isinstance(entry, int) or (isinstance(entry, dict) and isinstance(entry.get("bytes"), int))):
                raise ValueError(f"entry of {name} has no size")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is corrupt ({e}); resume from an earlier "
                              f"checkpoint with --resume_from") from e
    misfit = manifest_misfit(ckpt, man)
    if misfit:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} {misfit} (a manifest copied from another "
                              f"checkpoint?); resume from an earlier checkpoint with --resume_from")
    return man


def manifest_misfit(ckpt: Path, man: dict) -> str | None:
    """What in a manifest contradicts its folder: the step of its name, a parent that is not an earlier
    step_N, a world that is not the rank files it lists. None if it fits."""
    own = step_of(ckpt.name)
    step, world, parent = man.get("step"), man.get("world"), man.get("parent")
    if own is not None and step != own:
        return f"says step {step!r} but sits in {ckpt.name}"
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        return f"says world {world!r}, not a number of ranks"
    if parent is not None and (not isinstance(parent, str) or step_of(parent) is None
                               or (own is not None and step_of(parent) >= own)):
        return f"names parent {parent!r}, not an earlier checkpoint (step_N below {ckpt.name})"
    ranks = {int(m.group(1)) for n in man["files"] if (m := _RANK_FILE.fullmatch(n))}
    if ranks and ranks != set(range(world)):
        return f"says world {world} but lists the data positions of ranks {sorted(ranks)}"
    return None


def file_problems(ckpt: Path, man: dict, part: int = 0, parts: int = 1, checksums: bool = True) -> list[str]:
    """What is wrong with the files of a checkpoint: missing, other size, other checksum.

    Sizes are checked for every file; checksums only for files[part::parts], so that the ranks
    of a job can each read a share of a multi-GB checkpoint, and none without checksums (a quick look)."""
    bad = []
    for i, (name, entry) in enumerate(man["files"].items()):
        size, digest = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry.get(HASH))
        f = ckpt / name
        if not f.is_file():
            bad.append(f"{name} (missing)")
        elif f.stat().st_size != size:
            bad.append(f"{name} ({f.stat().st_size} bytes, expected {size})")
        elif checksums and digest is not None and i % parts == part and file_digest(f) != digest:
            bad.append(f"{name} (checksum differs: the content changed after it was written)")
    return bad


def damaged_error(ckpt: Path, bad: list[str]) -> CheckpointError:
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return CheckpointError(f"checkpoint {ckpt} is damaged: " + ", ".join(bad[:10]) + more
                           + "; resume from an earlier checkpoint with --resume_from")


def verify(ckpt: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint (all checksums read); raises
    CheckpointError naming the damaged files."""
    man = read_manifest(ckpt)
    bad = file_problems(ckpt, man)
    if bad:
        raise damaged_error(ckpt, bad)
    return man


def pointer(root: Path) -> tuple[Path | None, str | None]:
    """What `latest` says: (the complete checkpoint it names, None), or (None, why it is no use: missing,
    unreadable, empty, garbled, naming no complete checkpoint). It is a hint: resume_candidates decides."""
    ptr = root / LATEST
    if not ptr.exists():
        return None, f"{ptr} is missing"
    try:
        name = ptr.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{ptr} cannot be read ({os_problem(e) if isinstance(e, OSError) else 'not text'})"
    if not name:
        return None, f"{ptr} is empty"
    if step_of(name) is None:
        return None, f"{ptr} holds {name[:80]!r}, not a checkpoint name (step_N)"
    if not (root / name / MANIFEST).is_file():
        return None, f"{ptr} names {name}, which is {'incomplete' if (root / name).is_dir() else 'not there'}"
    return root / name, None


def latest(root: Path) -> Path | None:
    """The checkpoint --resume_from auto starts from (resume_candidates; it may be damaged), or None."""
    cands, _ = resume_candidates(root)
    return cands[0] if cands else None


def complete(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, newest (highest step) first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p.name) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: step_of(p.name), reverse=True)


def _parent(ckpt: Path) -> str | None:
    try:
        parent = json.loads((ckpt / MANIFEST).read_text()).get("parent")
    except (OSError, ValueError, AttributeError):
        return None
    return parent if isinstance(parent, str) else None


def lineage(root: Path, start: Path) -> list[Path]:
    """start and its ancestors by manifest "parent", newest first, as far as manifests allow."""
    out, seen, cur = [], set(), start
    while cur is not None and cur.name not in seen and (cur / MANIFEST).is_file():
        out.append(cur)
        seen.add(cur.name)
        parent = _parent(cur)
        cur = root / parent if parent else None
    return out


def _written(ckpt: Path) -> tuple[float, int]:
    """Sort key "most recently written": the manifest's mtime (written last), then the step."""
    try:
        return (ckpt / MANIFEST).stat().st_mtime, step_of(ckpt.name)
    except OSError:
        return 0.0, step_of(ckpt.name)


def heads(root: Path) -> list[Path]:
    """The newest checkpoint of every lineage (one no other complete checkpoint names as parent), the most
    recently written first. A child written before the folder it names does not count: that folder was
    rewritten by another history (a rollback run that reached the same step)."""
    found = complete(root)
    when = {p.name: _written(p)[0] for p in found}
    named = {par for p in found if (par := _parent(p)) in when and when[par] <= when[p.name]}
    return sorted((p for p in found if p.name not in named), key=_written, reverse=True)


def resume_candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Where auto-resume looks, in order, and notes on why it does not start where `latest` points.

    `latest` is a hint. Naming a complete checkpoint P: the newest checkpoint descending from P (a
    crash between a save and the pointer, or a pointer edited back; a legitimate rollback run wrote its
    own checkpoint, so the abandoned later history does not descend from the pointer), else P. Missing,
    unreadable, empty, garbled or naming no complete checkpoint: the most recently written head of the
    lineages, naming the others. Then that checkpoint's lineage; where the chain breaks (a parent with a
    missing or unreadable manifest, or a manifest without parents from an older dreamprm), every complete
    checkpoint at or below that step follows, newest first."""
    found = complete(root)
    ptr, why = pointer(root)
    notes = []
    if ptr is not None:
        later = [p for p in heads(root) if p != ptr and ptr in lineage(root, p) and _written(p) > _written(ptr)]
        start = later[0] if later else ptr
        if later:
            others = f" (other later histories from it, not resumed: {', '.join(p.name for p in later[1:])})" \
                if later[1:] else ""
            notes.append(f"{root / LATEST} names {ptr.name}, but {start.name} continues from it and was written "
                         f"later: resuming from {start.name}{others}")
    elif not found:
        if (root / LATEST).exists():  # checkpoints were written here once: never start afresh silently
            notes.append(f"{why}, and {root} holds no complete checkpoint")
        return [], notes
    else:
        hs = heads(root) or found
        start = hs[0]
        others = f"; other histories, not resumed: {', '.join(p.name for p in hs[1:])} (pass --resume_from " \
                 "to pick one)" if hs[1:] else ""
        notes.append(f"{why}: resuming from {start.name}, the most recently written newest checkpoint of a "
                     f"lineage{others}")
    chain = lineage(root, start) or [start]
    try:
        man = json.loads((chain[-1] / MANIFEST).read_text())
        if "parent" in man:  # None: the first checkpoint of the run, nothing older belongs
            below = step_of(man["parent"]) if man["parent"] else None
        else:
            below = step_of(chain[-1].name) - 1
    except (OSError, ValueError, KeyError, TypeError):
        below = step_of(chain[-1].name) - 1
    older = [p for p in found if below is not None and step_of(p.name) <= below and p not in chain]
    return chain + older, notes


def shared_state(ckpt: Path) -> dict:
    import torch
    return torch.load(ckpt / SHARED_STATE, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------- cleaning up


def remove_tree(path: Path) -> str | None:
    """Delete a folder; returns what failed (None if it is gone), never hides an error."""
    failures = []
    shutil.rmtree(path, onerror=lambda fn, p, exc: failures.append(f"{p}: {os_problem(exc[1])}"))
    if failures or path.exists():
        return f"could not delete {path}: " + "; ".join(failures[:3])
    return None


def prune(root: Path, current: Path, keep_last: int, keep=()) -> list[str]:
    """Delete the older checkpoints of current's lineage beyond the newest keep_last.

    Never deleted: current, the folders in keep (the checkpoint the run resumed from), and
    anything outside the lineage (e.g. the later steps of a run that was rolled back: they
    are another history, left for the user). Returns one message per failed deletion."""
    chain = lineage(root, current)
    names = {current.name, *(Path(k).name for k in keep)}
    failures = []
    for old in chain[keep_last:]:
        if old.name not in names:
            err = remove_tree(old)
            if err:
                failures.append(err)
    return failures


def remove_partial(root: Path) -> list[str]:
    """Remove step_*.tmp folders (saves that never finished); returns notes of what was done."""
    notes = []
    for p in sorted(root.glob("step_*.tmp")):
        err = remove_tree(p)
        notes.append(err or f"removed {p}, a checkpoint save that never finished")
    return notes
