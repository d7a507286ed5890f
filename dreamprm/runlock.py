"""One job per run directory: a lock file naming its owner, taken by rank 0.

The LOCK is written whole into a temp file and linked into place (link fails if a LOCK
exists), so it is never empty or half-written, also on a full disk. A lock whose owner is
provably gone (same host and the pid is dead, or the same Slurm job id, i.e. this job
requeued) is taken over with a note; anything else is an error that says who holds it and
how to clear it. slurm/preflight.py calls check() before any rank starts.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from dreamprm.checkpoint import os_problem
from dreamprm.errors import RunLockError

LOCK = "LOCK"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(held: dict, me: dict) -> bool:
    if held.get("slurm_job_id") and held["slurm_job_id"] == me["slurm_job_id"]:
        return True  # the same job, requeued (rank 0 may now be on another host): its previous run is over
    return held.get("host") == me["host"] and not _alive(int(held.get("pid", -1)))


def _read(path: Path) -> dict:
    """The owner recorded in an existing LOCK; RunLockError if it cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise RunLockError(f"cannot read the lock {path}: {os_problem(e)}") from e
    why = "is empty" if not text.strip() else None
    if why is None:
        try:
            held = json.loads(text)
            if isinstance(held, dict) and {"host", "pid"} <= held.keys():
                return held
            why = f"does not name an owner ({text[:80]!r})"
        except json.JSONDecodeError:
            why = f"is not JSON ({text[:80]!r})"
    raise RunLockError(f"the lock {path} {why}: it was not written by this version of dreamprm (which writes it "
                       f"whole). If no job is using {path.parent}, delete {path} and start again")


def _holder_error(path: Path, held: dict) -> RunLockError:
    job = f" (Slurm job {held['slurm_job_id']})" if held.get("slurm_job_id") else ""
    return RunLockError(
        f"run directory {path.parent} is in use by pid {held.get('pid')} on {held.get('host')}{job} since "
        f"{held.get('since')}. Two jobs must not write one run directory: use another --output_dir, "
        f"or if that job is gone, delete {path}")


def check(run_dir: Path) -> str | None:
    """Without taking it: None if the lock is free, a note if it is stale; RunLockError if held."""
    path = Path(run_dir) / LOCK
    held = _read(path)
    if not held:
        return None
    if _stale(held, _owner()):
        return f"the lock {path} of a job that is gone will be taken over (was {held})"
    raise _holder_error(path, held)


def acquire(run_dir: Path) -> tuple[Path, str | None]:
    """Take the lock; returns (lock path, a note if a stale lock was replaced)."""
    run_dir = Path(run_dir)
    path, me, note = run_dir / LOCK, _owner(), None
    tmp = run_dir / f".{LOCK}.{os.getpid()}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunLockError(f"cannot write the lock {path}: {os_problem(e)}; free space or fix the permissions "
                           f"of {run_dir}, or use another --output_dir") from e
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)  # atomic, and fails if a LOCK exists
                return path, note
            except FileExistsError:
                held = _read(path)
                if held and not _stale(held, me):
                    raise _holder_error(path, held) from None
                if held:
                    note = f"replaced a stale lock in {run_dir} (was {held})"
                path.unlink(missing_ok=True)
            except OSError as e:
                raise RunLockError(f"cannot write the lock {path}: {os_problem(e)}") from e
        raise RunLockError(f"could not take the lock {path}: another job took it at the same time")
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Remove the lock if this process holds it. Called while a run ends, maybe on an error:
    a failure here is printed, so that it never hides that error."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        print(f"dreamprm: warning: could not release the lock {path} ({e}); delete it before the next run "
              "if no job is using it", file=sys.stderr)
