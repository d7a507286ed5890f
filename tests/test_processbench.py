"""bench/processbench.py: the split and labelling of the real ProcessBench files (default suite), and the
cpu-smoke profile end to end on SmolLM2 (slow; CI runs it with `pytest -m slow -k smollm2`).

Both skip when ../shared/realdata is absent (DREAMPRM_SHARED points elsewhere). The smoke checks the
pipeline (three runs finish, the table and the metrics are there), not whether reweighting helps.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_processbench", ROOT / "bench" / "processbench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PB = _bench()
needs_data = pytest.mark.skipif(not (PB.SHARED / "processbench" / "gsm8k.json").is_file(),
                                reason=f"{PB.SHARED}/processbench is absent")


def _read(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def _args(tmp_path, seed=0, **kw):
    sizes = {"n_human": 6, "n_outcome": 8, "n_meta": 4, "n_test": 6, "shortest": 0, **kw}
    return argparse.Namespace(data=PB.SHARED, human_split="gsm8k", outcome_split="math", meta="heldout", seed=seed,
                              work_dir=tmp_path / f"w{seed}", **sizes)


@needs_data
def test_split_is_disjoint_balanced_seeded_and_labels_each_domain_as_it_says(tmp_path):
    from dreamprm.data.readers import load_records

    files = PB.build_data(_args(tmp_path))
    truth = {f"{s}-{r.id}": r for s in ("gsm8k", "math")
             for r in load_records(str(PB.SHARED / "processbench" / f"{s}.json"), "processbench")}
    train, meta = _read(files["train"]), _read(files["meta"])
    tests = {s: _read(files[f"test_{s}"]) for s in ("gsm8k", "math")}
    human = [r for r in train if r["domain"] == "human"]
    outcome = [r for r in train if r["domain"] == "outcome"]
    assert len(human) == 6 and len(outcome) == 8 and len(train) == 14
    assert {r["id"]: r for r in _read(files["train_human"])} == {r["id"]: r for r in human}  # the oracle's
    for r in human:  # ProcessBench's own labels: 1 before the first error, 0 there, nothing after
        assert r["id"].startswith("gsm8k-") and r["labels"] == truth[r["id"]].labels
    for r in outcome:  # the final answer's correctness on every step
        t = truth[r["id"]]
        assert r["id"].startswith("math-") and r["labels"] == [t.outcome] * len(t.steps)
        assert r["outcome"] == t.outcome and r["meta"]["first_error"] == t.meta["first_error"]
    assert len(meta) == 8 and all(set(r["labels"]) == {None} and r["outcome"] in (0.0, 1.0) for r in meta)
    for split, rows in tests.items():  # human labels, half erroneous
        assert len(rows) == 6 and all(r["labels"] == truth[r["id"]].labels and r["domain"] == split for r in rows)
        assert sum(r["meta"]["first_error"] == -1 for r in rows) == 3
    parts = [{r["id"] for r in rows} for rows in (train, meta, *tests.values())]
    assert sum(map(len, parts)) == len(set().union(*parts))  # no row in two parts
    assert sum(r["meta"]["first_error"] == -1 for r in outcome) == 4

    again, other = PB.build_data(_args(tmp_path / "a")), PB.build_data(_args(tmp_path, seed=1))
    assert Path(again["train"]).read_text() == Path(files["train"]).read_text()
    assert {r["id"] for r in _read(other["train"])} != {r["id"] for r in train}


@needs_data
def test_shortest_pool_and_sizes_that_do_not_fit_name_the_flags(tmp_path):
    files = PB.build_data(_args(tmp_path, n_human=3, n_outcome=3, n_meta=2, n_test=3, shortest=16))
    assert len(_read(files["train"])) == 6
    with pytest.raises(PB.BenchError, match=r"--n_human \+ --n_meta \+ --n_test need 201 erroneous .* gsm8k split; "
                                            r"it has 207 and 193.*lower them"):
        PB.build_data(_args(tmp_path, n_human=400, n_meta=1, n_test=2))


def test_missing_data_and_model_are_one_message_each(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc = PB.main(["--profile", "cpu-smoke", "--data", str(tmp_path / "nowhere"), "--model", str(model),
                  "--work_dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1 and "nowhere/processbench/gsm8k.json: missing" in err and "--data DIR" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        PB.main(["--profile", "cpu-smoke", "--model", str(tmp_path / "nope"), "--methods", "uniform,best"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--methods: 'best' is not one of" in err and "--model" in err


@pytest.mark.slow
@needs_data
def test_smollm2_processbench_smoke_trains_and_scores_every_method(smol_dir, tmp_path):
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, "bench/processbench.py", "--profile", "cpu-smoke", "--model", str(smol_dir),
                        "--work_dir", str(work)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for m in PB.METHODS:
        assert json.loads((work / m / "status.json").read_text())["state"] == "finished"
        assert f"\n| {m} | " in p.stdout
    res = json.loads((work / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == list(PB.METHODS)
    for r in rows.values():
        assert 0 <= r["step_auroc"] <= 1 and 0 <= r["pb_f1"] <= 1 and r["wall_s"] > 0, r
        assert r["n_test_scored"] == 6 and set(r["split_f1"]) == {"gsm8k", "math"}
    assert rows["uniform"]["weight"] == {"human": 1.0, "outcome": 1.0}
    assert rows["oracle"]["weight"] == {"human": 1.0, "outcome": None}
    assert all(w > 0 for w in rows["reweight"]["weight"].values())
    train = _read(work / "data" / "train.jsonl")
    outcome = [r for r in train if r["domain"] == "outcome"]
    assert outcome and all(r["labels"] == [r["outcome"]] * len(r["steps"]) for r in outcome)
    cfg = (work / "reweight" / "config.yaml").read_text()
    assert "baseline: false" in cfg and "mode: lora" in cfg
