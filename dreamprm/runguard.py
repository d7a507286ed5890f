"""The run guard: what keeps a run directory honest from a job's first moment to its last.

- one job per run directory: a LOCK file naming its owner, taken by rank 0;
- SIGTERM / Ctrl+C set a flag that the loop reads after each update (checkpoint, then exit 128+signal);
- status.json says what the job is doing (starting, running, finished, stopped, failed with the error)
  from the moment the lock is held, and a run that fails for any reason leaves `failed` behind;
- a finished run run again says so and changes nothing;
- a collective that timed out or lost a peer is reported naming the silent ranks.

The LOCK is written whole into a temp file and linked into place (link fails if a LOCK
exists), so it is never empty or half-written, also on a full disk. A lock whose owner is
provably gone (same host and the pid is dead, or the same Slurm job id, i.e. this job
requeued) is taken over with a note; anything else is an error that says who holds it and
how to clear it. slurm/preflight.py calls check() before any rank starts.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt
from dreamprm import dist, resume
from dreamprm.checkpoint import os_problem, write_json_atomic
from dreamprm.config import CHECKPOINTS_DIR
from dreamprm.errors import CheckpointError, CollectiveError, DreamPRMError, RunLockError

LOCK = "LOCK"
# OS errors of a run directory that the user fixes (space, a read-only mount, permissions, chattr +i)
_RUN_DIR_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


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


# ---------------------------------------------------------------- the guard of a training job


def write_status(run_dir: Path, status: dict) -> None:
    """status.json; a failure to write it (disk full, read-only) is reported, not raised, so
    that it never hides the error that ended the run."""
    try:
        write_json_atomic(run_dir / "status.json", {**status, "updated": time.time()})
    except OSError as e:
        print(f"dreamprm: could not record state {status.get('state')!r} in status.json: {e}", file=sys.stderr)


def finished_note(cfg, ckpt_root: Path) -> str | None:
    """What to say when the checkpoint the run would resume from (resume.resolve_resume's choice) is already
    at its total_steps (resume.kept_total_steps under --epochs), else None. Read before anything is built; a
    checkpoint it cannot read is left to the resume."""
    if cfg.run.resume_from == "none":
        return None

    def end(path: Path) -> tuple[int, int] | None:  # (step, total_steps) when nothing is left to train from path
        step = ckpt.read_manifest(path)["step"]
        total = resume.kept_total_steps(cfg, path) if cfg.train.epochs else cfg.train.total_steps
        return (step, total) if total is not None and step >= total else None

    def problems_of(path: Path) -> list[str]:
        # Checksums are read only for a checkpoint at its end: the resume's fallbacks have lower steps, so one
        # short of its end gives an unfinished run whether it is intact or not (the resume verifies it).
        try:
            if end(path) is not None:
                ckpt.verify(path)
            return []
        except CheckpointError as e:
            return [str(e)]

    try:
        path, _ = resume.resolve_resume(cfg, ckpt_root, problems_of)
        done = end(path) if path is not None else None
    except (TypeError, OSError, ValueError, KeyError, RuntimeError, CheckpointError):
        return None
    if done is None:
        return None
    (step, total), flag = done, "--epochs" if cfg.train.epochs else "--total_steps"
    more = f"--epochs {2 * cfg.train.epochs:g}" if cfg.train.epochs else f"--total_steps {2 * step}"
    return (f"{cfg.run.output_dir} is finished: checkpoint {path.name} is at update {step} and total_steps is "
            f"{total}, so there is nothing to train; nothing was changed. To train further, run the same command "
            f"with a larger {flag} (e.g. {more}); it resumes from update {step}. To start over, use another "
            "--output_dir.")


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


class RunGuard:
    """`with RunGuard(cfg, rank) as guard:` around a training job.

    On entry: signal handlers installed (a signal during start-up also ends cleanly), the lock taken
    (rank 0; every rank learns the outcome), and, unless the run is finished (guard.finished holds the
    note) or a dry run, status.json set to `starting`. guard.status is the dict written to status.json;
    the loop updates it and calls write(). On exit: an exception is recorded as `failed` (a collective
    failure becomes a CollectiveError naming the silent ranks), status.json written once more, the
    signal handlers restored and the lock released.
    """

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank = cfg, rank
        self.run_dir = Path(cfg.run.output_dir)
        self.signum = 0
        self.finished: str | None = None
        self.status: dict = {}
        self._lock, self._old = None, {}

    def _on_signal(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> RunGuard:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not self.cfg.run.dry_run:
                self._take_lock()
                # rank 0 reads it (checksums included) and every rank learns the outcome
                self.finished = dist.broadcast_object(
                    finished_note(self.cfg, self.run_dir / CHECKPOINTS_DIR) if self.rank == 0 else None)
                if not self.finished:
                    total = None if self.cfg.train.epochs else self.cfg.train.total_steps  # None: --epochs, unresolved
                    self.status = {"state": "starting", "step": None, "total_steps": total, "last_checkpoint": None}
                    self.write()
        except BaseException:
            self._release()
            raise
        return self

    def _take_lock(self) -> None:
        try:
            lock, note = acquire(self.run_dir) if self.rank == 0 else (None, None)
            err = None
        except RunLockError as e:
            lock, note, err = None, None, str(e)
        self._lock = lock
        note, err = dist.broadcast_object((note, err))
        if err:
            raise RunLockError(err)
        if note and self.rank == 0:
            print(note, flush=True)

    def stop_requested(self) -> bool:
        """Whether any rank got a signal (a collective: every rank must ask at the same point)."""
        return dist.all_reduce_(torch.tensor([float(self.signum)])).item() > 0

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def write(self) -> None:
        if self.rank == 0 and self.status and self.run_dir.is_dir():
            write_status(self.run_dir, self.status)

    def __exit__(self, typ, e, tb) -> None:
        try:
            if e is not None and self.status:
                if dist.collective_failed(e):  # a lost node or a hung rank: name it, then stop
                    err = CollectiveError(collective_message(
                        e, dist.silent_ranks(min(60, self.cfg.run.collective_timeout)),
                        self.cfg.run.collective_timeout, self.status.get("step"), self.status.get("last_checkpoint")))
                    self.status.update(state="failed", error=str(err))
                    self.write()
                    raise err from e
                if isinstance(e, OSError) and e.errno in _RUN_DIR_FAULTS:  # the machine's, not a bug: no traceback
                    what = f"{os_problem(e)}: {e.filename}" if e.filename else (e.strerror or os_problem(e))
                    err = DreamPRMError(
                        f"{what} (run directory {self.run_dir}); the run stopped at "
                        f"update {self.status.get('step')}; its last checkpoint is "
                        f"{self.status.get('last_checkpoint') or 'none'}. Fix it and run the same command to resume")
                    self.status.update(state="failed", error=str(err))
                    self.write()
                    raise err from e
                self.status.update(state="failed", error=f"{type(e).__name__}: {e}")
            self.write()
        finally:
            self._release()

    def _release(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self._lock is not None:
            release(self._lock)
            self._lock = None
