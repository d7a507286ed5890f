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


def written_in_order(root: Path) -> None:
    """Manifest mtimes one second apart in the order the folders were made (file times are coarse)."""
    for i, d in enumerate(sorted(root.glob("step_*/" + ck.MANIFEST), key=lambda m: m.stat().st_mtime_ns)):
        os.utime(d, (1_000_000 + i, 1_000_000 + i))


def names(root: Path) -> list[str]:
    return [p.name for p in ck.resume_candidates(root)[0]]


def test_resume_candidates_follow_the_lineage_after_a_rollback(tmp_path):
    # history A: 2 -> 4 -> 6; rolled back to 2, history B: 2 -> 3 -> 5
    for step, parent in ((2, None), (4, 2), (6, 4), (3, 2), (5, 3)):
        fake(tmp_path, step, parent)
    written_in_order(tmp_path)
    ck.write_latest(tmp_path, ck.tag(5))
    assert ck.resume_candidates(tmp_path) == ([tmp_path / ck.tag(s) for s in (5, 3, 2)], [])
    (tmp_path / ck.tag(3) / ck.MANIFEST).unlink()  # chain broken: older complete ones, newest first
    assert names(tmp_path) == [ck.tag(5), ck.tag(2)]
    # no pointer: the most recently written head (5, not the higher step 6 of the abandoned history)
    (tmp_path / ck.LATEST).unlink()
    cands, notes = ck.resume_candidates(tmp_path)
    assert [p.name for p in cands] == [ck.tag(5), ck.tag(2)]
    assert f"{tmp_path / ck.LATEST} is missing: resuming from {ck.tag(5)}" in notes[0]
    assert f"other histories, not resumed: {ck.tag(6)}" in notes[0]


@pytest.mark.parametrize("content,why", [("", "is empty"), ("\n\n", "is empty"), ("step_7\x00garbage", "not a "
                                         "checkpoint name"), (b"\xff\xfe\x00", "cannot be read"),
                                         ("step_00000009", "which is not there")])
def test_a_damaged_pointer_falls_back_to_the_newest_checkpoint_and_says_why(tmp_path, content, why):
    for step in (3, 6):
        fake(tmp_path, step, step - 3 or None)
    written_in_order(tmp_path)
    ptr = tmp_path / ck.LATEST
    ptr.write_bytes(content if isinstance(content, bytes) else content.encode())
    cands, notes = ck.resume_candidates(tmp_path)
    assert [p.name for p in cands] == [ck.tag(6), ck.tag(3)] and ck.latest(tmp_path) == tmp_path / ck.tag(6)
    assert len(notes) == 1 and why in notes[0] and f"resuming from {ck.tag(6)}" in notes[0], notes


def test_a_pointer_naming_an_incomplete_folder_and_no_checkpoint_at_all_is_an_error(tmp_path):
    (tmp_path / ck.tag(4)).mkdir()  # a folder without a manifest
    ck.write_latest(tmp_path, ck.tag(4))
    cands, notes = ck.resume_candidates(tmp_path)
    assert cands == [] and "which is incomplete" in notes[0] and "holds no complete checkpoint" in notes[0]


def test_a_pointer_older_than_a_checkpoint_descending_from_it_is_passed_over(tmp_path):
    # 3 -> 6 -> 9, pointer edited back to 6 (or the job died between writing step_9 and the pointer)
    for step in (3, 6, 9):
        fake(tmp_path, step, step - 3 or None)
    written_in_order(tmp_path)
    ck.write_latest(tmp_path, ck.tag(6))
    cands, notes = ck.resume_candidates(tmp_path)
    assert [p.name for p in cands] == [ck.tag(9), ck.tag(6), ck.tag(3)]
    assert f"names {ck.tag(6)}, but {ck.tag(9)} continues from it" in notes[0]


def test_a_legitimate_rollback_is_not_undone_by_the_abandoned_later_history(tmp_path):
    # 10 -> 20 -> 30 -> 40; --resume_from step_20 wrote 25 (parent 20): latest = 25
    for step, parent in ((10, None), (20, 10), (30, 20), (40, 30), (25, 20)):
        fake(tmp_path, step, parent)
    written_in_order(tmp_path)
    ck.write_latest(tmp_path, ck.tag(25))
    assert ck.resume_candidates(tmp_path) == ([tmp_path / ck.tag(s) for s in (25, 20, 10)], [])
    # the rollback run went on to rewrite step_30 (parent 25): the old step_40 names step_30 but is older
    import shutil
    shutil.rmtree(tmp_path / ck.tag(30))
    fake(tmp_path, 30, 25)
    os.utime(tmp_path / ck.tag(30) / ck.MANIFEST, (2_000_000, 2_000_000))
    ck.write_latest(tmp_path, ck.tag(30))
    assert names(tmp_path) == [ck.tag(s) for s in (30, 25, 20, 10)]
    (tmp_path / ck.LATEST).unlink()
    assert names(tmp_path) == [ck.tag(s) for s in (30, 25, 20, 10)]


@pytest.mark.parametrize("edit,says", [({"step": 6}, "says step 6 but sits in step_00000009"),
                                       ({"parent": "step_00000012"}, "names parent 'step_00000012'"),
                                       ({"world": 0}, "says world 0"),
                                       ({"world": 2}, "says world 2 but lists the data positions of ranks [0]")])
def test_a_manifest_that_does_not_fit_its_folder_is_named(tmp_path, edit, says):
    d = fake(tmp_path, 9, 6, files={ck.SHARED_STATE: b"s", ck.rank_file(0): b"r"})
    man = json.loads((d / ck.MANIFEST).read_text())
    (d / ck.MANIFEST).write_text(json.dumps({**man, **edit}))
    with pytest.raises(CheckpointError, match="MANIFEST.json " + says.replace("[", "\\[").replace("]", "\\]")):
        ck.verify(d)


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


def test_a_published_folder_keeps_the_one_that_was_first(tmp_path):
    out = tmp_path / "tiny"
    first, second = ck.AtomicFolder(out, tmp=tmp_path / "a"), ck.AtomicFolder(out, tmp=tmp_path / "b")
    for folder in (first, second):
        (folder.begin() / "model.txt").write_text(folder.tmp.name)
    assert first.publish() == out
    with pytest.raises(OSError):  # the second builder lost the race: its folder is not swapped in
        second.publish()
    second.abort()
    assert (out / "model.txt").read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


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


def test_a_writer_that_loses_the_errno_gets_the_real_cause_of_an_immutable_folder(tmp_path, monkeypatch):
    # torch's C++ writer says "Parent directory ... does not exist" for a `chattr +i` folder; the probe
    # write says what it is (simulated: chattr needs root and a file system that has the attribute)
    def immutable(dir):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dir))
    monkeypatch.setattr(ck.tempfile, "TemporaryFile", immutable)
    e = RuntimeError(f"Parent directory {tmp_path}/step_00000003.tmp does not exist.")
    assert ck.write_problem(e, tmp_path) == (f"operation not permitted (an immutable folder? lsattr -d shows it, "
                                             f"chattr -i clears it): {tmp_path}")
    monkeypatch.undo()
    assert ck.write_problem(e, tmp_path) == f"RuntimeError: {e}"  # a writable folder: the error as it is
