"""dreamprm/checkpoint.py: files, checksums, lineage, atomic writes.

Plain files only (no engine): fake checkpoint folders with real manifests. The end-to-end
faults (a real run damaged, rolled back, out of disk) are in tests/test_faults.py.
"""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dreamprm import checkpoint as ck
from dreamprm.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def fake(root: Path, step: int, parent: int | None, files=None) -> Path:
    """A complete checkpoint folder as engine.save_checkpoint leaves it."""
    d = root / ck.tag(step)
    d.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"weights" * 100, ck.SHARED_STATE: b"state"}).items():
        (d / name).write_bytes(data)
    ck.write_manifest(d, step, 1, 0, ck.tag(parent) if parent is not None else None,
                      ck.describe_files(d, ck.list_files(d)))
    return d


def test_reading_a_manifest_never_imports_deepspeed(tmp_path):
    d = fake(tmp_path, 1, None)
    code = ("import sys; from pathlib import Path; from dreamprm import checkpoint, export, scoring; "
            f"checkpoint.verify(Path({str(d)!r})); scoring.resolve_checkpoint(Path({str(d)!r})); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_a_flipped_byte_of_the_same_size_is_found_and_named(tmp_path):
    d = fake(tmp_path, 3, None)
    assert ck.verify(d)["step"] == 3
    f = d / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[17] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt \\(checksum differs"):
        ck.verify(d)
    # shared among ranks: only the rank that reads the file's checksum sees it; sizes on all
    names = list(ck.read_manifest(d)["files"])
    i = names.index("mp_rank_00_model_states.pt")
    assert ck.file_problems(d, ck.read_manifest(d), part=i % 2, parts=2)
    assert not ck.file_problems(d, ck.read_manifest(d), part=1 - i % 2, parts=2)


def test_manifests_of_the_sizes_only_format_still_verify(tmp_path):
    d = tmp_path / ck.tag(5)
    d.mkdir()
    (d / "a.pt").write_bytes(b"x" * 10)
    (d / ck.MANIFEST).write_text(json.dumps({"step": 5, "world": 1, "stage": 0, "files": {"a.pt": 10}}))
    assert ck.verify(d)["step"] == 5
    (d / "a.pt").write_bytes(b"x" * 11)
    with pytest.raises(CheckpointError, match="11 bytes, expected 10"):
        ck.verify(d)
    (d / ck.MANIFEST).write_text("{\"files\": ")
    with pytest.raises(CheckpointError, match="MANIFEST.json is corrupt"):
        ck.verify(d)


def test_resume_candidates_follow_the_lineage_after_a_rollback(tmp_path):
    # history A: 2 -> 4 -> 6; rolled back to 2, history B: 2 -> 3 -> 5
    for step, parent in ((2, None), (4, 2), (6, 4), (3, 2), (5, 3)):
        fake(tmp_path, step, parent)
    ck.write_latest(tmp_path, ck.tag(5))
    assert [p.name for p in ck.resume_candidates(tmp_path)] == [ck.tag(5), ck.tag(3), ck.tag(2)]
    (tmp_path / ck.tag(3) / ck.MANIFEST).unlink()  # chain broken: older complete ones, newest first
    assert [p.name for p in ck.resume_candidates(tmp_path)] == [ck.tag(5), ck.tag(2)]
    (tmp_path / ck.LATEST).unlink()
    assert [p.name for p in ck.resume_candidates(tmp_path)] == [ck.tag(6), ck.tag(5), ck.tag(4), ck.tag(2)]


def test_pruning_keeps_the_new_the_resumed_and_other_histories(tmp_path):
    for step, parent in ((2, None), (4, 2), (6, 4)):
        fake(tmp_path, step, parent)
    # resumed from step 2 with keep_last 1: the new checkpoint and step 2 stay, 4 and 6 are another history
    new = fake(tmp_path, 3, 2)
    assert ck.prune(tmp_path, new, keep_last=1, keep=[tmp_path / ck.tag(2)]) == []
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ck.tag(s) for s in (2, 3, 4, 6)]
    newer = fake(tmp_path, 5, 3)
    assert ck.prune(tmp_path, newer, keep_last=1, keep=[tmp_path / ck.tag(2)]) == []
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ck.tag(s) for s in (2, 4, 5, 6)]
    # a plain run: the newest keep_last of the lineage
    run = tmp_path / "plain"
    for step in range(1, 6):
        last = fake(run, step, step - 1 if step > 1 else None)
    ck.prune(run, last, keep_last=2)
    assert sorted(p.name for p in run.glob("step_*")) == [ck.tag(4), ck.tag(5)]


def test_a_failed_deletion_is_reported_not_ignored(tmp_path, monkeypatch):
    for step in (1, 2):
        last = fake(tmp_path, step, step - 1 if step > 1 else None)

    def rmtree(path, onerror):
        onerror(os.unlink, str(Path(path) / "x"), (OSError, OSError(errno.EACCES, "Permission denied"), None))
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    failures = ck.prune(tmp_path, last, keep_last=1)
    assert len(failures) == 1 and f"could not delete {tmp_path / ck.tag(1)}" in failures[0]
    assert "permission denied" in failures[0]


def test_atomic_writer_leaves_nothing_behind_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    ck.write_json_atomic(target, {"state": "running"})
    assert json.loads(target.read_text()) == {"state": "running"}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: disk full"):
        ck.write_json_atomic(target, {"state": "failed"})
    assert json.loads(target.read_text()) == {"state": "running"}  # the old content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_atomic_folder_replaces_the_old_one_whole_or_leaves_it(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    leftover = tmp_path / "export.tmp"
    leftover.mkdir()
    (leftover / "stale.txt").write_text("from a crashed write")
    with ck.AtomicFolder(out, tmp=leftover) as tmp:
        assert tmp == leftover and not any(tmp.iterdir())  # the leftover removed first
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # nothing replaced before the folder is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(RuntimeError, match="half-way"):
        with ck.AtomicFolder(out) as tmp:  # default temporary name: hidden, next to the final folder
            assert tmp.parent == tmp_path and tmp.name.startswith(".export.tmp")
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # a failed write leaves the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # and no temporary one


def test_atomic_folder_names_a_leftover_it_cannot_delete(tmp_path, monkeypatch):
    folder = ck.AtomicFolder(tmp_path / "step_00000001", tmp=tmp_path / "step_00000001.tmp")
    folder.tmp.mkdir()

    def rmtree(path, onerror):
        onerror(os.unlink, str(Path(path) / "x"), (OSError, OSError(errno.EACCES, "Permission denied"), None))
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    with pytest.raises(OSError, match=f"could not delete {folder.tmp}: .*permission denied"):
        folder.begin()


def test_write_problems_are_named():
    assert ck.os_problem(OSError(errno.ENOSPC, "x")) == "disk full"
    assert ck.os_problem(OSError(errno.EROFS, "x")) == "read-only file system"
    assert ck.os_problem(OSError(errno.EACCES, "x")) == "permission denied"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomic_creates_with_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ck.write_atomic(tmp_path / "f", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode and (tmp_path / "f").read_bytes() == b"data"


def test_write_atomic_interrupted_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"old")

    def interrupt(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ck.write_atomic(tmp_path / "f", b"new")
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"old"
