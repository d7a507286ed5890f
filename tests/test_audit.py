"""dreamprm.audit: `dreamprm weights RUN_DIR` on a real demo run (report, --json, --plot, --keep / --min_weight
--out) and on hand-built run directories (several sources, weights without a source, bad input)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dreamprm import audit, checkpoint, cli
from dreamprm.data.readers import load_records
from dreamprm.data.record import Record, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
ENV.pop("RANK", None)
DEMO_TRAIN = ROOT / "dreamprm" / "demo" / "train.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(out: Path, *flags) -> Path:
    p = subprocess.run([sys.executable, "launch/train.py", "--output_dir", str(out), "--disable_wandb", *flags],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's command (domain table; domain noisy has 40% of its step labels flipped)."""
    return train(tmp_path_factory.mktemp("audit") / "demo")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return train(tmp_path_factory.mktemp("audit") / "base", "--baseline", "--total_steps", "2")


def weights(*args) -> int:
    return cli.main(["weights", *map(str, args)])


def learned(run: Path) -> dict:
    return {r["id"]: r["weight"] for r in map(json.loads, (run / "instance_weights.jsonl").open())}


def copy_run(run: Path, to: Path) -> Path:
    """The run's files without its checkpoints (what `dreamprm weights` reads)."""
    to.mkdir()
    for name in ("config.yaml", "status.json", "metrics.jsonl", "instance_weights.jsonl"):
        shutil.copy(run / name, to / name)
    return to


def fail(capsys, *args) -> str:
    """Run `dreamprm weights`, expect exit 1 and one message on stderr; return it."""
    assert weights(*args) == 1
    cap = capsys.readouterr()
    assert cap.err.startswith("dreamprm weights: ") and "Traceback" not in cap.err and not cap.out
    return cap.err


# ---------------------------------------------------------------- the demo run


def test_report_names_the_noisy_records_lowest(demo, capsys):
    assert weights(demo, "--top", 5) == 0
    out = capsys.readouterr().out
    lowest = out.split("5 lowest weighted")[1].split("5 highest weighted")[0]
    highest = out.split("5 highest weighted")[1]
    ids = [re.findall(r"^  \d\.\d{4}  (\S+)  \(source train", part, re.M) for part in (lowest, highest)]
    assert len(ids[0]) == len(ids[1]) == 5
    assert all(i.startswith("noisy-") for i in ids[0]) and all(i.startswith("clean-") for i in ids[1]), ids
    rec = {r.id: r for r in load_records(DEMO_TRAIN, "minif2f")}[ids[0][0]]
    assert f"question: {' '.join(rec.question.split())}" in lowest  # the question on one line
    assert f"step 1 [{rec.labels[0]:g}]: {rec.steps[0]}" in lowest
    noisy = re.search(r"^noisy\s+(\d+)\s+(\d+)\s+([\d.]+)", out, re.M)
    clean = re.search(r"^clean\s+(\d+)\s+(\d+)\s+([\d.]+)", out, re.M)
    assert noisy[1] == clean[1] == "120" and float(noisy[3]) < 0.9 < 1.1 < float(clean[3])


def test_json_report(demo, capsys):
    assert weights(demo, "--json", "--top", 3) == 0
    rep = json.loads(capsys.readouterr().out)
    w = learned(demo)
    assert rep["state"] == "finished" and rep["weights"] == "domain_table"
    assert rep["records"] == rep["weighted"] == 240 and rep["mean"] == pytest.approx(1, abs=1e-5)
    assert list(rep["by_source"]) == ["train"] and rep["by_source"]["train"]["records"] == 240
    noisy, clean = rep["by_domain"]["noisy"], rep["by_domain"]["clean"]
    assert noisy["records"] == clean["records"] == 120
    assert noisy["mean"] < clean["mean"]
    for g in (noisy, clean, rep["by_source"]["train"]):
        assert g["min"] <= g["10%"] <= g["50%"] <= g["90%"] <= g["max"]
    assert noisy["max"] == pytest.approx(max(v for k, v in w.items() if k.startswith("noisy-")))
    recs = {r.id: r for r in load_records(DEMO_TRAIN, "minif2f")}
    for e in rep["lowest"] + rep["highest"]:  # whole questions and steps, and the weight of the row
        r = recs[e["id"]]
        assert (e["question"], e["steps"], e["labels"], e["weight"]) == (r.question, r.steps, r.labels, w[e["id"]])
    assert [e["id"][:5] for e in rep["lowest"]] == ["noisy"] * 3 and len(rep["highest"]) == 3


def test_the_weights_name_the_checkpoint_they_are_from(demo, capsys):
    rows = [json.loads(ln) for ln in (demo / "instance_weights.jsonl").open()]
    last = demo / "checkpoints" / "step_00000200"
    assert {(r["step"], r["manifest"]) for r in rows} == {(200, checkpoint.manifest_id(last))}
    assert weights(demo, "--top", 0) == 0
    cap = capsys.readouterr()
    assert "instance_weights.jsonl, as of step 200 (checkpoint step_00000200)" in cap.out.splitlines()[0]
    assert not cap.err
    assert weights(demo, "--json", "--top", 0) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["weights_step"] == 200 and rep["warnings"] == []


def test_weights_of_a_checkpoint_the_run_set_aside_are_reported_with_a_warning(demo, tmp_path, capsys):
    """As after a resume that fell back from step 200 to step 100: status.json names step 100, the weights file
    is still step 200's until the next save."""
    run = tmp_path / "run"
    shutil.copytree(demo, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps(status | {"state": "running",
                                                          "last_checkpoint": str(run / "checkpoints/step_00000100")}))
    assert weights(run, "--json", "--top", 0) == 0
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert rep["weights_step"] == 200 and len(rep["warnings"]) == 1
    assert cap.err == f"dreamprm weights: warning: {rep['warnings'][0]}\n"
    assert "holds the weights of step_00000200, but the run's newest intact checkpoint is step_00000100" in cap.err


def test_keep_half_writes_a_file_data_check_passes(demo, tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    assert weights(demo, "--keep", 0.5, "--out", out, "--top", 0) == 0
    text = capsys.readouterr().out
    assert "source train: 120 kept, 120 dropped of 240" in text and f"wrote 120 records to {out}" in text
    assert cli.main(["data", "check", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"] == 120 and s["domains"] == {"clean": 120}  # the noisy half is the one dropped
    w, recs = learned(demo), {r.id: r for r in load_records(DEMO_TRAIN, "minif2f")}
    kept = load_records(out)
    assert [r.id for r in kept] == [i for i in recs if i in {r.id for r in kept}]  # in training order
    for r in kept:
        assert r.meta["weight"] == w[r.id] and (r.steps, r.labels) == (recs[r.id].steps, recs[r.id].labels)
    assert out.stat().st_mode & 0o777 == 0o644 and sorted(os.listdir(tmp_path)) == ["clean.jsonl"]

    assert weights(demo, "--keep", 0.5, "--json") == 0  # no --out: the same summary, nothing written
    f = json.loads(capsys.readouterr().out)["filter"]
    assert (f["kept"], f["dropped"], f["by_source"]["train"]["dropped"]) == (120, 120, 120) and "out" not in f


def test_min_weight(demo, tmp_path, capsys):
    w = learned(demo)
    cut = sorted(set(w.values()))[-1]  # the clean domain's weight
    assert weights(demo, "--min_weight", cut, "--out", tmp_path / "k.jsonl", "--json") == 0
    assert json.loads(capsys.readouterr().out)["filter"]["kept"] == sum(v >= cut for v in w.values())
    assert {r.id for r in load_records(tmp_path / "k.jsonl")} == {i for i, v in w.items() if v >= cut}


def test_plots(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert weights(demo, "--plot", tmp_path / "p", "--top", 0) == 0
    names = ["weight_spread.png", "weights_clean.png", "weights_noisy.png"]
    assert sorted(os.listdir(tmp_path / "p")) == names
    for n in names:
        data = (tmp_path / "p" / n).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert "wrote " + str(tmp_path / "p" / "weight_spread.png") in capsys.readouterr().out


def test_plot_without_matplotlib(demo, tmp_path, capsys, monkeypatch):
    real = audit.importlib.util.find_spec
    monkeypatch.setattr(audit.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    assert "--plot needs matplotlib: pip install 'dreamprm[plot]'" in fail(capsys, demo, "--plot", tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- bad input


def test_not_a_run_dir(tmp_path, capsys):
    assert "not a run directory (no config.yaml)" in fail(capsys, tmp_path)
    assert "not a run directory" in fail(capsys, tmp_path / "nope")


def test_baseline_run_learned_nothing(baseline, capsys):
    err = fail(capsys, baseline)
    assert "a baseline run" in err and "meta.baseline true" in err and "learned none" in err


@pytest.mark.parametrize("flags, message", [
    (["--keep", "0"], "--keep 0.0: must be in (0, 1]"),
    (["--keep", "1.5"], "--keep 1.5: must be in (0, 1]"),
    (["--keep", "nan"], "--keep nan: must be in (0, 1]"),
    (["--keep", "0.5", "--min_weight", "1"], "--keep and --min_weight: give one of them"),
    (["--min_weight", "-1"], "--min_weight -1.0: must be a finite number >= 0"),
    (["--out", "OUT/k.jsonl"], "needs --keep F or --min_weight W"),
    (["--keep", "0.5", "--out", "OUT"], "is a directory; give a file path"),
    (["--keep", "0.5", "--out", "OUT/no/k.jsonl"], "does not exist"),
    (["--top", "-1"], "--top -1: must be >= 0"),
])
def test_bad_flags(demo, tmp_path, capsys, flags, message):
    assert message in fail(capsys, demo, *[f.replace("OUT", str(tmp_path)) for f in flags])
    assert os.listdir(tmp_path) == []


def test_out_is_not_the_training_file(tmp_path, capsys):
    run = fake_run(tmp_path, {"a": [rec("a0"), rec("a1")]}, {"a": [0.5, 1.5]})
    src = tmp_path / "a.jsonl"
    before = src.read_bytes()
    assert "is the run's training file" in fail(capsys, run, "--keep", "0.5", "--out", src)
    assert src.read_bytes() == before


def test_damaged_weights_name_file_and_line(demo, tmp_path, capsys):
    run = copy_run(demo, tmp_path / "run")
    path = run / "instance_weights.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # a torn last line
    err = fail(capsys, run)
    assert f"{path}:240: not JSON" in err and "is damaged" in err
    bad = json.loads(lines[6]) | {"weight": -1}
    path.write_text("".join(lines[:6]) + json.dumps(bad) + "\n" + "".join(lines[7:]))
    assert f"{path}:7: weight: -1 is not a finite number >= 0" in fail(capsys, run)


def test_weights_from_other_data(demo, tmp_path, capsys):
    run = copy_run(demo, tmp_path / "run")
    path = run / "instance_weights.jsonl"
    rows = [json.loads(x) for x in path.open()]
    renamed = [dict(r, id="other-0001") if k == 3 else r for k, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    err = fail(capsys, run)
    assert "does not fit the run's training data" in err and "'other-0001' (line 4)" in err
    assert f"'{rows[3]['id']}' (train)" in err  # and the record that lost its row
    assert "--allow_unweighted" not in err  # not a matter of records left out of training

    path.write_text("".join(json.dumps(r) + "\n" for k, r in enumerate(rows) if k != 3))  # one row missing
    err = fail(capsys, run)
    assert f"1 training records have no row: '{rows[3]['id']}' (train)" in err and "--allow_unweighted" in err
    assert weights(run, "--allow_unweighted", "--keep", 1, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["records"], rep["weighted"], rep["filter"]["kept"]) == (240, 239, 239)
    assert rep["filter"]["by_source"]["train"] == {"records": 240, "kept": 239, "dropped": 1, "no_weight": 1}


def test_domain_changed_since_training(demo, tmp_path, capsys):
    run = copy_run(demo, tmp_path / "run")
    path = run / "instance_weights.jsonl"
    rows = [json.loads(x) for x in path.open()]
    rows[0]["domain"] = "noisy" if rows[0]["domain"] == "clean" else "clean"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "1 records had another domain in training" in fail(capsys, run)


def test_running_run_without_weights_yet(demo, tmp_path, capsys):
    run = copy_run(demo, tmp_path / "run")
    (run / "instance_weights.jsonl").unlink()
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 40}))
    err = fail(capsys, run)
    assert "not written yet (status.json: running at step 40)" in err and "every --save_every 100" in err


# ---------------------------------------------------------------- hand-built runs: several sources


def rec(i: str, labels=(1.0, 0.0)) -> Record:
    return Record(id=i, question=f"question {i}", steps=[f"step {k} of {i}" for k in range(len(labels))],
                  labels=list(labels), outcome=1.0)


def fake_run(tmp: Path, sources: dict, w: dict, with_source: bool = True) -> Path:
    """A run directory over the given sources (name -> records) whose instance_weights.jsonl gives the
    records of source s the weights w[s], in training order."""
    run = tmp / "run"
    run.mkdir()
    specs = []
    for name, recs in sources.items():
        write_jsonl(recs, tmp / f"{name}.jsonl")
        specs.append(f"{tmp / name}.jsonl,name={name}")
    cfg = {"data": {"train_file": specs, "train_format": "auto", "skip_invalid": False},
           "model": {"step_tag": "<extra_0>"}, "meta": {"baseline": False, "weights": "instance_table"},
           "run": {"save_every": 100}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 10}))
    rows, index = [], 0
    for name, recs in sources.items():
        for r, wi in zip(recs, w[name]):
            row = {"id": r.id, "index": index, "domain": name if len(sources) > 1 else r.domain, "weight": wi}
            rows.append(row | {"source": name} if with_source else row)
            index += 1
    (run / "instance_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.mark.parametrize("with_source", [True, False])
def test_sources_sharing_ids_keep_their_own_weights(tmp_path, capsys, with_source):
    """Rows without "source" (runs before it was written) find their source by training order."""
    run = fake_run(tmp_path, {"a": [rec("x"), rec("a1"), rec("a2")], "b": [rec("x"), rec("b1")]},
                   {"a": [0.2, 1.0, 1.2], "b": [1.6, 1.4]}, with_source)
    assert weights(run, "--json", "--top", 5) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(e["id"], e["source"], e["weight"]) for e in rep["lowest"][:2]] == [("x", "a", 0.2), ("a1", "a", 1.0)]
    assert (rep["highest"][0]["id"], rep["highest"][0]["source"]) == ("x", "b")
    assert rep["by_source"]["a"]["mean"] == pytest.approx(0.8) and rep["by_source"]["b"]["mean"] == pytest.approx(1.5)
    assert set(rep["by_domain"]) == {"a", "b"}  # several sources: a source's name is its domain


def test_keep_reports_dropped_per_source(tmp_path, capsys):
    run = fake_run(tmp_path, {"a": [rec(f"a{k}") for k in range(4)], "b": [rec(f"b{k}") for k in range(4)]},
                   {"a": [0.1, 0.2, 0.3, 1.5], "b": [1.1, 1.2, 1.3, 1.4]})
    out = tmp_path / "kept.jsonl"
    assert weights(run, "--keep", 0.6, "--out", out, "--top", 0) == 0  # ceil(0.6 * 8) = 5
    text = capsys.readouterr().out
    assert "source a: 1 kept, 3 dropped of 4" in text and "source b: 4 kept, 0 dropped of 4" in text
    kept = load_records(out)
    assert [(r.id, r.domain, r.meta["weight"]) for r in kept] == [
        ("a3", "a", 1.5), ("b0", "b", 1.1), ("b1", "b", 1.2), ("b2", "b", 1.3), ("b3", "b", 1.4)]


def test_kept_ids_shared_by_two_sources_cannot_share_a_file(tmp_path, capsys):
    run = fake_run(tmp_path, {"a": [rec("x"), rec("a1")], "b": [rec("x"), rec("b1")]},
                   {"a": [1.0, 1.0], "b": [1.0, 1.0]})
    err = fail(capsys, run, "--keep", 1, "--out", tmp_path / "k.jsonl")
    assert "share an id: 'x' (a, b)" in err and not (tmp_path / "k.jsonl").exists()


def test_a_transfer_run_says_its_weights_are_fixed_and_whose(tmp_path, capsys):
    """A run trained with --weights_from learned nothing: its weights are another run's, not its module's."""
    run = fake_run(tmp_path, {"a": [rec("a0"), rec("a1")]}, {"a": [0.5, 1.5]})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["meta"]["weights_from"] = "runs/proxy"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert weights(run, "--top", 0) == 0
    assert "weights fixed, transferred from runs/proxy, from" in capsys.readouterr().out.splitlines()[0]
    assert weights(run, "--json") == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "fixed, transferred from runs/proxy"


def test_weight_null_is_reported_and_not_kept(tmp_path, capsys):
    """The instance net has no weight for a record it never trained on."""
    run = fake_run(tmp_path, {"a": [rec("a0"), rec("a1"), rec("a2")]}, {"a": [0.5, None, 1.5]})
    assert weights(run, "--keep", 1, "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["by_source"]["a"]["weighted"] == 2 and rep["by_source"]["a"]["mean"] == pytest.approx(1.0)
    assert rep["filter"]["by_source"]["a"] == {"records": 3, "kept": 2, "dropped": 1, "no_weight": 1}
    assert not any(math.isnan(e["weight"]) for e in rep["lowest"])


def test_a_running_run_has_the_weights_of_its_last_checkpoint(tmp_path):
    """instance_weights.jsonl is written with every checkpoint: a run killed (or still running) after its
    first checkpoint can be audited, with the weights of that checkpoint."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--output_dir", str(out), "--disable_wandb",
                             "--total_steps", "2000", "--save_every", "5"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "instance_weights.jsonl").is_file():
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean stop: what is there was written by the checkpoint
        proc.wait()
    assert json.loads((out / "status.json").read_text())["state"] == "running"  # not written at the end only
    rows = [json.loads(ln) for ln in (out / "instance_weights.jsonl").open()]
    assert len(rows) == 240 and all(r["weight"] is not None for r in rows)
    assert cli.main(["weights", str(out), "--json"]) == 0
