"""dreamprm/data/learned.py: a run's instance_weights.jsonl read back, the checkpoint its rows name, and whether
that is the run's newest intact checkpoint (a resume that fell back leaves the weights of the one it set aside
until the next save). The trainer writing the rows is checked on a real run in tests/test_audit.py."""

import json

import pytest

from dreamprm import checkpoint as ck
from dreamprm.data.learned import newest_intact, read_learned, written_at
from dreamprm.errors import WeightsError


def save(root, step, parent=None):
    """A complete checkpoint folder of one file, with its manifest (checkpoint.write_manifest)."""
    folder = root / ck.tag(step)
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"x" * (100 + step))
    ck.write_manifest(folder, step, 1, 0, parent, ck.describe_files(folder, ["state.pt"]))
    ck.write_latest(root, folder.name)
    return folder


def run_dir(tmp_path, steps=(20, 40), weights_of=40, status=None):
    """A run whose checkpoints are `steps` (each the parent of the next) and whose weights file was written
    with the checkpoint of step weights_of."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    parent = None
    for s in steps:
        parent = save(root, s, parent).name
    (run / "config.yaml").write_text("data: {}\nmodel: {}\nmeta: {weights: instance_table}\n")
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    at = {"step": weights_of, "manifest": ck.manifest_id(root / ck.tag(weights_of))}
    rows = [{"id": f"r{i}", "index": i, "domain": None, "weight": 1.0, **at} for i in range(3)]
    (run / "instance_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_weights_of_the_newest_checkpoint_are_current(tmp_path):
    status = {"state": "finished", "last_checkpoint": str(tmp_path / "run/checkpoints/step_00000040")}
    run = run_dir(tmp_path, status=status)
    learned = read_learned(run)
    assert learned.step == 40 and learned.stale() is None
    assert written_at(learned.step) == "as of step 40 (checkpoint step_00000040)"


def test_after_a_resume_that_fell_back_the_weights_are_of_the_checkpoint_set_aside(tmp_path):
    """status.json names the checkpoint the run resumed from: the later one was passed over (damaged), whatever
    its files look like now."""
    status = {"state": "running", "last_checkpoint": str(tmp_path / "run/checkpoints/step_00000020")}
    stale = read_learned(run_dir(tmp_path, status=status)).stale()
    assert stale.startswith(f"{tmp_path / 'run/instance_weights.jsonl'} holds the weights of step_00000040, but "
                            "the run's newest intact checkpoint is step_00000020 (the run resumed from it")
    assert "step_00000040 was set aside" in stale and "next checkpoint" in stale


def test_a_damaged_newest_checkpoint_is_passed_over_as_resume_would(tmp_path):
    run = run_dir(tmp_path)  # no status.json: resume's candidates alone
    assert read_learned(run).stale() is None
    (run / "checkpoints" / ck.tag(40) / "state.pt").write_bytes(b"x")  # truncated
    assert newest_intact(run / "checkpoints", {}).name == ck.tag(20)
    assert "newest intact checkpoint is step_00000020" in read_learned(run).stale()
    (run / "checkpoints" / ck.tag(20) / ck.MANIFEST).unlink()
    assert "holds no intact checkpoint" in read_learned(run).stale()


def test_a_checkpoint_written_after_the_weights_or_rewritten_since(tmp_path):
    status = {"state": "stopped", "last_checkpoint": str(tmp_path / "run/checkpoints/step_00000040")}
    run = run_dir(tmp_path, weights_of=20, status=status)
    assert "newest intact checkpoint is step_00000040 (the run stopped before writing its weights)" \
        in read_learned(run).stale()
    run = run_dir(tmp_path / "again", status={})
    folder = run / "checkpoints" / ck.tag(40)  # the same step written again by another history
    (folder / "state.pt").write_bytes(b"y" * 140)
    ck.write_manifest(folder, 40, 1, 0, ck.tag(20), ck.describe_files(folder, ["state.pt"]))
    assert f"{folder} was written again since" in read_learned(run).stale()


def test_files_that_name_no_checkpoint_read_as_before(tmp_path):
    """Older runs' rows have no step; a file with no checkpoints beside it has nothing to be compared with."""
    run = run_dir(tmp_path)
    rows = [{k: v for k, v in json.loads(ln).items() if k not in ("step", "manifest")}
            for ln in (run / "instance_weights.jsonl").open()]
    (run / "instance_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    learned = read_learned(run)
    assert learned.step is None and learned.stale() is None and len(learned.rows) == 3
    assert written_at(None).startswith("its checkpoint not recorded")
    bare = tmp_path / "elsewhere.jsonl"
    bare.write_text(json.dumps({"id": "a", "index": 0, "domain": None, "weight": 1.0, "step": 40,
                                "manifest": "0123456789abcdef"}) + "\n")
    assert read_learned(bare, allow_file=True).stale() is None


def test_rows_of_two_checkpoints_are_damage(tmp_path):
    run = run_dir(tmp_path)
    path = run / "instance_weights.jsonl"
    rows = [json.loads(ln) for ln in path.open()]
    rows[2]["step"] = 20
    rows[1]["step"] = "forty"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(WeightsError) as e:
        read_learned(run)
    assert f"{path}:2: step: 'forty' is not an integer >= 0" in str(e.value)
    assert f"{path}:3: step 20, manifest {rows[0]['manifest']!r}: line 1 has step 40" in str(e.value)
