import argparse
import errno
import json
import os
import stat
import sys
import types
from pathlib import Path

import pytest

from dreamprm import metrics as M
from dreamprm.data.readers import load_records
from dreamprm.data.record import Record, write_jsonl
from dreamprm.evaluate import add_evaluate_parser, run_evaluate

REPO = Path(__file__).resolve().parents[1]
PROCESSBENCH = REPO.parent / "shared" / "realdata" / "processbench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*argv) -> int:
    p = argparse.ArgumentParser(prog="dreamprm")
    add_evaluate_parser(p.add_subparsers(dest="command", required=True))
    return run_evaluate(p.parse_args(["evaluate", *map(str, argv)]))


def rec(rid, labels, outcome=None, **meta) -> Record:
    return Record(rid, "q", [f"step {k}" for k in range(len(labels))], labels, outcome, meta=meta)


def write_scores(path, scores: dict) -> Path:
    path.write_text("".join(json.dumps({"id": k, "scores": v}) + "\n" for k, v in scores.items()))
    return path


def is_png(path) -> bool:
    return Path(path).stat().st_size > 100 and Path(path).read_bytes()[:8] == PNG_MAGIC


def test_processbench_cli_two_splits(tmp_path, capsys):
    write_jsonl([rec("a0", [1.0, 1.0, 0.0]), rec("a1", [1.0, 1.0]), rec("a2", [1.0, 0.0, None])],
                tmp_path / "alpha.jsonl")
    write_jsonl([rec("b0", [0.0, None]), rec("b1", [1.0, 1.0, 1.0])], tmp_path / "beta.jsonl")
    scores = write_scores(tmp_path / "s.jsonl", {
        "a0": [0.9, 0.8, 0.2],   # error at 2 found
        "a1": [0.9, 0.7],        # correct, predicted correct
        "a2": [0.9, 0.9, 0.1],   # error at 1 predicted at 2: miss
        "b0": [0.3, 0.9],        # error at 0 found
        "b1": [0.9, 0.4, 0.9]})  # correct, predicted wrong
    rc = cli("processbench", "--data", tmp_path / "alpha.jsonl", tmp_path / "beta.jsonl",
             "--from", "dreamprm", "--scores", scores, "--out", tmp_path / "r.json",
             "--plot", tmp_path / "plots")
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "processbench" and report["threshold"] == 0.5
    assert report["inputs"]["scores"] == str(scores)
    alpha, beta = report["metrics"]["splits"]["alpha"], report["metrics"]["splits"]["beta"]
    assert (alpha["acc_erroneous"], alpha["acc_correct"]) == (0.5, 1.0)
    assert alpha["f1"] == pytest.approx(2 / 3)
    assert (beta["acc_erroneous"], beta["acc_correct"], beta["f1"]) == (1.0, 0.0, 0.0)
    assert report["metrics"]["average_f1"] == pytest.approx(1 / 3)
    assert report["metrics"]["steps"]["n_labelled_steps"] == 11  # 3 + 2 + 2 + 1 + 3
    for name in ("reliability.png", "step_scores.png"):
        assert is_png(tmp_path / "plots" / name)
    out = capsys.readouterr().out
    assert "average" in out and "33.3" in out


def test_steps_cli_matches_metrics(tmp_path):
    recs = [rec("r0", [1.0, 0.0], outcome=0.0), rec("r1", [1.0, 1.0, None], outcome=1.0),
            rec("r2", [0.8, 0.3], outcome=0.0)]
    s = {"r0": [0.9, 0.3], "r1": [0.6, 0.5, 0.2], "r2": [0.45, 0.7]}
    write_jsonl(recs, tmp_path / "d.jsonl")
    rc = cli("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores",
             write_scores(tmp_path / "s.jsonl", s), "--aggregations", "min", "last",
             "--out", tmp_path / "r.json", "--plot", tmp_path / "p")
    assert rc == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    steps = [0.9, 0.3, 0.6, 0.5, 0.45, 0.7]
    labels = [1.0, 0.0, 1.0, 1.0, 0.8, 0.3]
    assert m["n_labelled_steps"] == 6 and m["n_steps"] == 7
    assert m["auroc"] == pytest.approx(M.auroc(steps, labels))
    assert m["f1_error"]["f1"] == pytest.approx(M.f1_at(steps, labels)["f1"])
    assert m["calibration"]["ece"] == pytest.approx(M.ece(steps, labels)["ece"])
    # min: r1 (0.2, correct) is lowest -> AUROC 0; last: r1 0.2 < r0 0.3 < r2 0.7 -> 0
    assert m["solution_auroc"] == {"min": 0.0, "last": 0.0}
    assert is_png(tmp_path / "p" / "reliability.png") and is_png(tmp_path / "p" / "step_scores.png")


def test_bon_cli_planted_scores(tmp_path, capsys):
    cands = [  # (group, correct, answer, step scores)
        (1, 0, "10", [0.99, 0.99, 0.3]), (1, 1, "12", [0.7, 0.7, 0.7]),
        (2, 1, "7", [0.25, 0.9]), (2, 0, "8", [0.55, 0.55]),
        (3, 1, "3", [0.6, 0.6]), (3, 0, "4", [0.95, 0.5]),
        (4, 0, "9", [0.5])]
    recs = [rec(f"c{i}", [None] * len(s), outcome=float(ok), group=g, answer=a)
            for i, (g, ok, a, s) in enumerate(cands)]
    write_jsonl(recs, tmp_path / "d.jsonl")
    scores = write_scores(tmp_path / "s.jsonl", {f"c{i}": c[3] for i, c in enumerate(cands)})
    rc = cli("bon", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores", scores,
             "--out", tmp_path / "r.json", "--plot", tmp_path / "p")
    assert rc == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    # picks per group (1, 2, 3, 4): min right,wrong,right,wrong; mean wrong,right,wrong,wrong;
    # prod right,wrong,wrong,wrong; last right,right,right,wrong; mean_logodds wrong,right,wrong,wrong
    assert m["selection"] == pytest.approx(
        {"mean_logodds": 0.25, "min": 0.5, "prod": 0.25, "mean": 0.25, "last": 0.75})
    assert m["random"] == pytest.approx((0.5 + 0.5 + 0.5 + 0) / 4)
    assert m["pass_at_n"] == 0.75
    assert m["majority"] == 0.5  # every vote ties -> first answer: wrong, right, right, wrong
    assert (m["n_groups"], m["mean_n"]) == (4, 1.75)
    assert is_png(tmp_path / "p" / "bon.png")
    assert "pass@N" in capsys.readouterr().out


def test_bad_scores_file_reports_everything(tmp_path, capsys):
    recs = [rec("x", [1.0, 1.0]), rec("y", [1.0, 1.0, 0.0]), rec("z", [1.0]), rec("w", [1.0])]
    recs += [rec(f"m{i}", [1.0]) for i in range(7)]
    write_jsonl(recs, tmp_path / "d.jsonl")
    lines = ['{"id": "x", "scores": [0.1, 0.2]}',
             '{"id": "x", "scores": [0.1, 0.2]}',        # 2: duplicate
             '{"id": "nope", "scores": [0.5]}',          # 3: not in the data
             '{"id": "y", "scores": [0.5, 0.5]}',        # 4: 2 scores for 3 steps
             '{"id": "z", "scores": [1.5',               # 5: malformed JSON
             '{"id": "z", "scores": [1.5]}',             # 6: out of [0, 1]
             '{"id": "w", "scores": [NaN]}',             # 7: not a number
             '[1, 2]']                                   # 8: not an object
    s = tmp_path / "s.jsonl"
    s.write_text("\n".join(lines) + "\n")
    rc = cli("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores", s)
    assert rc == 1
    err = capsys.readouterr().err
    for expected in [f"{s}:2: id 'x' is duplicated (first on line 1)",
                     f"{s}:3: id 'nope' is not in the data",
                     f"{s}:4: id 'y': expected 3 scores (one per step), got 2",
                     f"{s}:5: line: invalid JSON (Expecting",
                     f"{s}:6: id 'z': not a number in [0, 1]: scores[0]=1.5",
                     f"{s}:7: id 'w': not a number in [0, 1]: scores[0]=nan",
                     f"{s}:8: expected an object",
                     f"{s}: 7 of 11 records have no scores: 'm0', 'm1', 'm2', 'm3', 'm4' (and 2 more)"]:
        assert expected in err, expected


def test_bad_arguments_and_data(tmp_path, capsys):
    write_jsonl([rec("a", [1.0])], tmp_path / "d.jsonl")
    rc = cli("processbench", "--data", tmp_path / "d.jsonl", tmp_path / "missing.jsonl",
             "--scores", tmp_path / "none.jsonl", "--threshold", "1.5")
    err = capsys.readouterr().err
    assert rc == 1 and "--threshold 1.5" in err and "missing.jsonl: no such file" in err
    assert "none.jsonl: no such file" in err
    with pytest.raises(SystemExit):  # exactly one of --model / --scores
        cli("steps", "--data", tmp_path / "d.jsonl", "--model", tmp_path, "--scores", tmp_path / "s")
    with pytest.raises(SystemExit):  # --from is checked by argparse
        cli("steps", "--data", tmp_path / "d.jsonl", "--from", "nope", "--scores", tmp_path / "d.jsonl")
    write_jsonl([rec("a", [1.0]), rec("b", [None, 0.0])], tmp_path / "pb.jsonl")
    s = write_scores(tmp_path / "s.jsonl", {"a": [0.9], "b": [0.9, 0.1]})
    assert cli("processbench", "--data", tmp_path / "pb.jsonl", "--from", "dreamprm", "--scores", s) == 1
    assert "1 records have an unlabelled step before the first error" in capsys.readouterr().err
    assert cli("bon", "--data", tmp_path / "pb.jsonl", "--from", "dreamprm", "--scores", s) == 1
    err = capsys.readouterr().err
    assert "2 records have no meta.group" in err and "2 records have no outcome" in err


def test_model_branch_uses_scoring_module(tmp_path, monkeypatch, capsys):
    write_jsonl([rec("a", [1.0, 0.0]), rec("b", [1.0])], tmp_path / "d.jsonl")
    returned = {"a": [0.9, 0.1], "b": [0.8]}
    calls = []

    class Scorer:
        max_length, model_limit = 1024, 1024

        def score_records(self, records, batch_size):
            calls.append(([r.id for r in records], batch_size))
            return returned

    fake = types.ModuleType("dreamprm.scoring")
    fake.load_scorer = lambda path, step_tag=None, max_length=None: Scorer()
    monkeypatch.setitem(sys.modules, "dreamprm.scoring", fake)
    args = ("processbench", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--model", tmp_path,
            "--batch-size", "3", "--out", tmp_path / "r.json")
    assert cli(*args) == 0
    assert calls == [(["a", "b"], 3)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"]["model"] == str(tmp_path) and report["metrics"]["average_f1"] == 1.0
    returned["b"] = [0.8, 0.8]  # a scorer that disagrees with the data is reported, not trusted
    assert cli(*args) == 1
    assert "id 'b': expected 1 scores (one per step), got 2" in capsys.readouterr().err


def planted(n, k):
    """Perfect step scores for first error k: 1.0 before it, 0.0 at it; later steps do not matter."""
    return [1.0] * n if k == -1 else ([1.0] * k + [0.0] + [0.3, 0.9] * n)[:n]


needs_realdata = pytest.mark.skipif(not (PROCESSBENCH / "gsm8k.json").is_file(),
                                    reason="needs the shared real data next to the repo")


@needs_realdata
def test_real_processbench_gsm8k_planted_perfect_scores():
    raw = {d["id"]: d["label"] for d in json.loads((PROCESSBENCH / "gsm8k.json").read_text())}
    recs = load_records(PROCESSBENCH / "gsm8k.json", fmt="processbench")
    assert len(recs) == len(raw) == 400
    labels = [M.first_error_index(r.labels) for r in recs]
    assert labels == [raw[r.id] for r in recs]
    assert sum(k == -1 for k in labels) == 193
    perfect = [planted(len(r.steps), k) for r, k in zip(recs, labels)]
    r = M.processbench(labels, perfect)
    assert (r["acc_erroneous"], r["acc_correct"], r["f1"]) == (1.0, 1.0, 1.0)
    assert (r["n_erroneous"], r["n_correct"]) == (207, 193)
    all_ok = M.processbench(labels, [[1.0] * len(r.steps) for r in recs])
    assert (all_ok["acc_erroneous"], all_ok["acc_correct"], all_ok["f1"]) == (0.0, 1.0, 0.0)


@needs_realdata
def test_real_processbench_all_splits_cli(tmp_path, capsys):
    files = sorted(PROCESSBENCH.glob("*.json"))
    scores = {}
    for f in files:
        for d in json.loads(f.read_text()):
            scores[d["id"]] = planted(len(d["steps"]), d["label"])
    s = write_scores(tmp_path / "s.jsonl", scores)
    assert cli("processbench", "--data", *files, "--from", "processbench", "--scores", s,
               "--out", tmp_path / "r.json") == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert set(m["splits"]) == {"gsm8k", "math", "olympiadbench", "omnimath"}
    assert m["average_f1"] == 1.0
    assert {k: v["n_correct"] for k, v in m["splits"].items()} == {
        "gsm8k": 193, "math": 406, "olympiadbench": 339, "omnimath": 241}


def test_help_names_real_paths_and_save_scores_needs_model(tmp_path, capsys):
    from dreamprm.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "runs/prm/final" not in text and "--model runs/prm " in text  # a run dir is what --model takes
    with pytest.raises(SystemExit):
        main(["evaluate", "steps", "--help"])
    text = capsys.readouterr().out
    assert "--save-scores" in text and "a run directory" in text
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q", "steps": ["s"], "labels": [1]}) + "\n")
    scores = tmp_path / "s.jsonl"
    scores.write_text(json.dumps({"id": "a", "scores": [0.9]}) + "\n")
    rc = main(["evaluate", "steps", "--data", str(data), "--scores", str(scores), "--save-scores",
               str(tmp_path / "x.jsonl")])
    assert rc == 1 and "--save-scores: is for --model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- files written whole, bad inputs

def fake_scorer(monkeypatch, returned):
    class Scorer:
        max_length, model_limit = 1024, 1024
        calls = 0

        def score_records(self, records, batch_size):
            Scorer.calls += 1
            return returned

    fake = types.ModuleType("dreamprm.scoring")
    fake.load_scorer = lambda path, step_tag=None, max_length=None: Scorer()
    monkeypatch.setitem(sys.modules, "dreamprm.scoring", fake)
    return Scorer


def test_outputs_are_whole_files_with_the_usual_mode(tmp_path, monkeypatch, capsys):
    write_jsonl([rec("a", [1.0, 0.0]), rec("b", [1.0])], tmp_path / "d.jsonl")
    fake_scorer(monkeypatch, {"a": [0.9, 0.1], "b": [0.8]})
    out = tmp_path / "out"
    args = ("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--model", tmp_path,
            "--save-scores", out / "s.jsonl", "--out", out / "r.json", "--plot", out / "plots")
    old = os.umask(0o022)
    try:
        assert cli(*args) == 0
    finally:
        os.umask(old)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["plots/reliability.png", "plots/step_scores.png", "r.json", "s.jsonl"]  # no temp files
    assert all(stat.S_IMODE((out / f).stat().st_mode) == 0o644 for f in files)
    assert [json.loads(line)["id"] for line in (out / "s.jsonl").read_text().splitlines()] == ["a", "b"]
    assert is_png(out / "plots" / "reliability.png") and json.loads((out / "r.json").read_text())["task"] == "steps"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    for f in files:
        (out / f).write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert cli(*args) == 1  # the first write fails; every old file is left as it was
    err = capsys.readouterr().err
    assert err == f"dreamprm evaluate steps: --save-scores: cannot write {out / 's.jsonl'}: disk full\n"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == files
    assert all((out / f).read_bytes() == b"old" for f in files)
    scores = write_scores(tmp_path / "given.jsonl", {"a": [0.9, 0.1], "b": [0.8]})
    for flag, path in (("--plot", out / "plots"), ("--out", out / "r.json")):
        assert cli("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores", scores, flag, path) == 1
        assert f"{flag}: cannot write {path}" in capsys.readouterr().err
        assert all((out / f).read_bytes() == b"old" for f in files)


def test_bad_output_paths_fail_before_scoring(tmp_path, monkeypatch, capsys):
    write_jsonl([rec("a", [1.0])], tmp_path / "d.jsonl")
    scorer = fake_scorer(monkeypatch, {"a": [0.9]})
    (tmp_path / "file").write_text("x")
    rc = cli("steps", "--data", tmp_path / "d.jsonl", "--model", tmp_path, "--out", tmp_path,
             "--save-scores", tmp_path, "--plot", tmp_path / "file")
    err = capsys.readouterr().err
    assert rc == 1 and scorer.calls == 0
    assert f"--out {tmp_path}: is a directory; name a file" in err
    assert f"--save-scores {tmp_path}: is a directory; name a file" in err
    assert f"--plot {tmp_path / 'file'}: is a file; name a folder" in err
    rc = cli("steps", "--data", tmp_path / "d.jsonl", "--model", tmp_path, "--out", tmp_path / "file" / "r.json")
    assert rc == 1 and f"--out {tmp_path / 'file' / 'r.json'}: a parent of it is a file" in capsys.readouterr().err


def test_bad_data_and_scores_files_one_message_each(tmp_path, capsys):
    write_jsonl([rec(f"r{i}", [1.0]) for i in range(5)], tmp_path / "d.jsonl")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    assert cli("steps", "--data", tmp_path / "dir", "--scores", tmp_path / "fifo") == 1
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'dir'}: is a directory, not a data file" in err
    assert f"--scores {tmp_path / 'fifo'}: is a named pipe (FIFO)" in err
    s = tmp_path / "s.jsonl"
    s.write_bytes(b'{"id": "r0", "scores": [0.5]}\n'
                  b'{"id": "r1", "scores": [' + b"[" * 5000 + b"]" * 5000 + b"]}\n"
                  b'{"id": "r2", "scores": [' + b"1" * 5000 + b"]}\n"
                  b'{"id": "r3", "scores": [0.5], "scores": [0.6]}\n'
                  b'{"id": "r4", "scores": ["\xff"]}\n')
    assert cli("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores", s) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{s}:2: line: JSON nested too deeply" in err and f"{s}:3: line: an integer has more than 4300 digits" in err
    assert f"{s}:4: line: duplicate key 'scores'" in err and f"{s}:5: line: not valid UTF-8 (byte 0xff" in err
    s.write_text("\n\n")
    assert cli("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--scores", s) == 1
    assert f"--scores {s}: is empty (no scores)" in capsys.readouterr().err


def test_model_default_max_length_is_the_model_limit_and_limit_takes_the_first_records(tmp_path, monkeypatch,
                                                                                      capsys):
    """A model trained short (every CPU smoke) scores up to its limit, saying so; --limit N scores N records."""
    write_jsonl([rec("a", [1.0, 0.0]), rec("b", [1.0]), rec("c", [0.0])], tmp_path / "d.jsonl")
    seen = []

    class Scorer:
        def __init__(self, max_length):
            self.max_length, self.model_limit = min(max_length or 128, 1024), 1024  # trained at 128

        def score_records(self, records, batch_size):
            seen.append((self.max_length, [r.id for r in records]))
            return {r.id: [0.9] * len(r.steps) for r in records}

    fake = types.ModuleType("dreamprm.scoring")
    fake.load_scorer = lambda path, step_tag=None, max_length=None: Scorer(max_length)
    monkeypatch.setitem(sys.modules, "dreamprm.scoring", fake)
    data = ("steps", "--data", tmp_path / "d.jsonl", "--from", "dreamprm", "--model", tmp_path)
    assert cli(*data, "--limit", "2") == 0
    assert seen[-1] == (1024, ["a", "b"])
    assert ("max_length 1024 (the model's limit); it was trained at 128 tokens, so longer solutions are scored "
            "beyond its training length (--max-length 128 keeps to it)") in capsys.readouterr().out
    assert cli(*data, "--max-length", "128") == 0
    assert seen[-1] == (128, ["a", "b", "c"])
    assert cli(*data, "--limit", "0") == 1
    assert "--limit 0: must be >= 1" in capsys.readouterr().err
    assert cli("steps", "--data", tmp_path / "d.jsonl", "--scores", tmp_path / "d.jsonl", "--limit", "1") == 1
    assert "--limit: is for --model" in capsys.readouterr().err

