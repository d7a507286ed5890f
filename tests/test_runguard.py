"""dreamprm/runguard.py: the LOCK, status.json from the first moment, the finished-run note, the
collective-failure message. The end-to-end signal and lock cases are in tests/test_train.py and
tests/test_faults.py."""

import errno
import json
import os
import subprocess
import sys

import pytest

from dreamprm import runguard
from dreamprm.config import Config
from dreamprm.errors import DreamPRMError, RunLockError


def test_run_lock_blocks_a_second_job_and_replaces_a_dead_one(tmp_path):
    lock, note = runguard.acquire(tmp_path)
    assert note is None
    with pytest.raises(RunLockError, match="in use by pid"):
        runguard.acquire(tmp_path)
    runguard.release(lock)
    assert not lock.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "slurm_job_id": None}))
    lock2, note = runguard.acquire(tmp_path)
    assert note and "stale" in note
    runguard.release(lock2)


@pytest.mark.parametrize("content, says", [("", "is empty"), ('{"host": "h", "pi', "is not JSON"),
                                           ('{"x": 1}', "does not name an owner")])
def test_an_empty_or_corrupt_lock_says_so(tmp_path, content, says):
    (tmp_path / runguard.LOCK).write_text(content)
    for fn in (runguard.acquire, runguard.check):
        with pytest.raises(RunLockError, match=says) as e:
            fn(tmp_path)
        assert "None" not in str(e.value) and f"delete {tmp_path / runguard.LOCK}" in str(e.value)


def test_lock_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runguard.os, "fsync", full)
    with pytest.raises(RunLockError, match="cannot write the lock .*: disk full"):
        runguard.acquire(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no empty LOCK to block the next start
    monkeypatch.undo()
    lock, note = runguard.acquire(tmp_path)
    assert note is None and json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [runguard.LOCK]
    runguard.release(lock)


def test_lock_check_for_preflight(tmp_path, monkeypatch):
    assert runguard.check(tmp_path) is None
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / runguard.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                                         "slurm_job_id": "41", "since": "then"}))
        with pytest.raises(RunLockError, match=f"in use by pid {holder.pid}"):
            runguard.check(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued: taken over
        assert "will be taken over" in runguard.check(tmp_path)
        lock, note = runguard.acquire(tmp_path)
        assert "stale" in note
        runguard.release(lock)
    finally:
        holder.kill()
        holder.wait()


def _cfg(tmp_path, **run) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def test_status_says_starting_from_the_first_moment_and_failed_on_any_error(tmp_path):
    cfg = _cfg(tmp_path)
    status = tmp_path / "run" / "status.json"
    with pytest.raises(ValueError, match="model folder without weights"):
        with runguard.RunGuard(cfg, 0):
            assert json.loads(status.read_text())["state"] == "starting"  # before any model is built
            assert (tmp_path / "run" / runguard.LOCK).is_file()
            raise ValueError("model folder without weights")
    st = json.loads(status.read_text())
    assert st["state"] == "failed" and st["error"] == "ValueError: model folder without weights"
    assert not (tmp_path / "run" / runguard.LOCK).exists()  # released on the way out


def test_a_dry_run_writes_nothing_and_a_finished_run_is_left_alone(tmp_path):
    with runguard.RunGuard(_cfg(tmp_path, dry_run=True), 0) as g:
        assert g.finished is None
    assert not (tmp_path / "run").exists()
    from dreamprm import checkpoint as ck
    root = tmp_path / "run" / "checkpoints"
    (root / ck.tag(2000)).mkdir(parents=True)
    (root / ck.tag(2000) / ck.MANIFEST).write_text(json.dumps({"step": 2000, "world": 1, "files": {}}))
    ck.write_latest(root, ck.tag(2000))
    (tmp_path / "run" / "status.json").write_text('{"state": "finished"}')
    with runguard.RunGuard(_cfg(tmp_path), 0) as g:
        assert "is finished" in g.finished and "--total_steps 4000" in g.finished
    assert json.loads((tmp_path / "run" / "status.json").read_text()) == {"state": "finished"}


def test_a_signal_sets_the_flag_and_the_exit_code_says_which():
    import signal
    with runguard.RunGuard(_cfg(__import__("pathlib").Path("/nonexistent-dreamprm"), dry_run=True), 0) as g:
        assert not g.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert g.stop_requested() and g.exit_code() == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.parametrize("silent, text, who", [
    ([1], "Timed out waiting 600000ms", "rank 1 went silent"),
    (None, "Timed out waiting 600000ms", "a rank or node went silent"),
    (None, "Connection closed by peer", "a rank died or a node was lost")])
def test_collective_failures_name_who_and_where_to_resume(silent, text, who):
    msg = runguard.collective_message(RuntimeError(text), silent, 600, 7, "runs/x/checkpoints/step_5")
    assert msg.startswith(who) and "update 7" in msg and "resume from runs/x/checkpoints/step_5" in msg


@pytest.mark.parametrize("code,says", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "disk full"),
                                       (errno.EPERM, "operation not permitted (an immutable folder?")])
def test_a_run_directory_fault_fails_cleanly_with_status_failed(tmp_path, code, says):
    cfg = _cfg(tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with pytest.raises(DreamPRMError) as e:
        with runguard.RunGuard(cfg, 0) as g:
            g.status.update(state="running", step=7, last_checkpoint="runs/x/checkpoints/step_5")
            raise OSError(code, os.strerror(code), str(metrics))  # as open(metrics, "a") raises it
    assert str(e.value).startswith(f"{says}") and f"{metrics} (run directory {tmp_path / 'run'})" in str(e.value)
    assert "stopped at update 7; its last checkpoint is runs/x/checkpoints/step_5" in str(e.value)
    st = json.loads((tmp_path / "run" / "status.json").read_text())
    assert st["state"] == "failed" and st["error"] == str(e.value)


def test_a_finished_run_behind_a_garbled_pointer_is_still_found_finished(tmp_path):
    from dreamprm import checkpoint as ck
    root = tmp_path / "run" / "checkpoints"
    (root / ck.tag(2000)).mkdir(parents=True)
    (root / ck.tag(2000) / ck.MANIFEST).write_text(json.dumps({"step": 2000, "world": 1, "files": {}}))
    (root / ck.LATEST).write_text("\x00\x00")
    assert "is finished: checkpoint step_00002000" in runguard.finished_note(_cfg(tmp_path), root)


def _checkpoint(root, step, parent, train=None):
    import torch

    from dreamprm import checkpoint as ck
    d = root / ck.tag(step)
    d.mkdir(parents=True)
    (d / "a.pt").write_bytes(b"x" * step)
    if train is not None:  # the config a checkpoint holds; --epochs reads its total_steps
        torch.save({"config": {"train": train}}, d / ck.SHARED_STATE)
    ck.write_manifest(d, step, 1, 0, ck.tag(parent) if parent else None, ck.describe_files(d, ["a.pt"]))
    ck.write_latest(root, ck.tag(step))
    return d


def test_the_finished_note_takes_the_checkpoint_the_resume_takes(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 2, None)
    last = _checkpoint(root, 4, 2)
    cfg = _cfg(tmp_path)
    cfg.train.total_steps = 4
    assert "is finished: checkpoint step_00000004 is at update 4" in runguard.finished_note(cfg, root)
    (last / "a.pt").write_bytes(b"y" * 4)  # same size, other content: the resume passes over it to step 2
    assert runguard.finished_note(cfg, root) is None
    cfg.run.resume_from = str(last)  # named: the resume refuses it
    assert runguard.finished_note(cfg, root) is None


def test_the_finished_note_under_epochs_keeps_the_checkpoints_total_steps(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 4, None, train={"epochs": 0.5, "total_steps": 4})
    cfg = _cfg(tmp_path)
    cfg.train.epochs, cfg.train.total_steps = 0.5, 1000  # total_steps: what the checkpoint's config says
    note = runguard.finished_note(cfg, root)
    assert "total_steps is 4" in note and "a larger --epochs (e.g. --epochs 1)" in note
    cfg.train.epochs = 1  # resolved again once the data is read
    assert runguard.finished_note(cfg, root) is None
