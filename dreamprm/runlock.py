"""One job per run directory: a lock file naming its owner, taken by rank 0.

A lock whose owner is provably gone (same host and the pid is dead, or the same Slurm job
id, i.e. this job requeued) is taken over with a note; anything else is an error that says
who holds it and how to clear it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

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
        return True  # the same job, requeued: its previous run is over
    return held.get("host") == me["host"] and not _alive(int(held.get("pid", -1)))


def acquire(run_dir: Path) -> tuple[Path, str | None]:
    """Take the lock; returns (lock path, a note if a stale lock was replaced)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, me, note = run_dir / LOCK, _owner(), None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                held = {}
            if held and _stale(held, me):
                note = f"replaced a stale lock in {run_dir} (was {held})"
                path.unlink(missing_ok=True)
                continue
            raise RunLockError(
                f"run directory {run_dir} is in use by pid {held.get('pid')} on {held.get('host')}"
                f"{' (Slurm job ' + held['slurm_job_id'] + ')' if held.get('slurm_job_id') else ''} since "
                f"{held.get('since')}. Two jobs must not write one run directory: use another --output_dir, "
                f"or if that job is gone, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path, note
    raise RunLockError(f"could not take the lock {path}")


def release(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass
