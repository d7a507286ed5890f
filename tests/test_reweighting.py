"""bench/reweighting.py: the generator (corruption kinds at their rates, clean meta set, checkable
steps) and a tiny end-to-end run that writes the table. Never asserts the experiment's targets."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("reweighting", ROOT / "bench" / "reweighting.py")
R = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(R)


def args_for(*extra):
    return R.build_parser().parse_args(list(extra))


def first_wrong(steps):
    ok = [R.check_step(s) for s in steps]
    return ok.index(False) if False in ok else -1


def prefix_labels(fe, n):
    return [1.0 if fe == -1 or k < fe else 0.0 for k in range(n)]


@pytest.mark.parametrize("slips", ["odd", "any"])
def test_steps_are_checkable_and_true_labels_follow_the_first_wrong_step(tmp_path, slips):
    a = args_for("--n_train", "60", "--n_test", "60", "--n_bon_groups", "10", "--slips", slips)
    files = R.generate(a, 0, tmp_path)
    for name in ("train", "test", "bon"):
        for r in R.read_jsonl(files[name]):
            fe = first_wrong(r["steps"])
            assert r["meta"]["first_error"] == fe
            assert r["meta"].get("true_labels", r["labels"]) == prefix_labels(fe, len(r["steps"]))
            assert r["outcome"] == (1.0 if fe == -1 else 0.0)
            assert a.min_steps <= len(r["steps"]) <= a.max_steps
    for r in R.read_jsonl(files["test"]) + R.read_jsonl(files["bon"]):  # evaluation data is clean
        assert r["labels"] == prefix_labels(r["meta"]["first_error"], len(r["steps"]))


def test_meta_set_is_clean_and_outcome_only(tmp_path):
    files = R.generate(args_for("--n_train", "20", "--n_meta", "80"), 1, tmp_path)
    meta = R.read_jsonl(files["meta"])
    assert len(meta) == 80
    for r in meta:
        assert r["labels"] == [None] * len(r["steps"]) and r["domain"] is None
        assert r["outcome"] == (1.0 if first_wrong(r["steps"]) == -1 else 0.0)
    assert 0.3 < sum(r["outcome"] for r in meta) / len(meta) < 0.7


def test_best_of_n_groups_share_a_question(tmp_path):
    a = args_for("--n_bon_groups", "12", "--bon_n", "6")
    rows = R.read_jsonl(R.generate(a, 2, tmp_path)["bon"])
    groups = {}
    for r in rows:
        groups.setdefault(r["meta"]["group"], set()).add(r["question"])
    assert len(groups) == 12 and all(len(q) == 1 for q in groups.values())
    assert len(rows) == 72


def test_corruption_kinds_at_their_rates(tmp_path):
    a = args_for("--domains", "clean,flip,opt,shift", "--kinds", "none,flip,optimistic,shift",
                 "--rates", "0,0.3,0.5,0.5", "--n_train", "1500")
    by_dom = {}
    for r in R.read_jsonl(R.generate(a, 3, tmp_path)["train"]):
        by_dom.setdefault(r["domain"], []).append(r)
    assert not any(r["meta"]["corrupted"] for r in by_dom["clean"])
    for r in (r for d in by_dom.values() for r in d):
        assert r["meta"]["corrupted"] == (r["labels"] != r["meta"]["true_labels"])
    # flip: every step label flipped independently at the rate
    pairs = [(y, t) for r in by_dom["flip"] for y, t in zip(r["labels"], r["meta"]["true_labels"])]
    assert abs(sum(y != t for y, t in pairs) / len(pairs) - 0.3) < 0.03
    # optimistic: only wrong solutions, all steps marked correct, at the rate
    wrong = [r for r in by_dom["opt"] if r["outcome"] == 0.0]
    assert not any(r["meta"]["corrupted"] for r in by_dom["opt"] if r["outcome"] == 1.0)
    hit = [r for r in wrong if r["meta"]["corrupted"]]
    assert all(r["labels"] == [1.0] * len(r["steps"]) for r in hit)
    assert abs(len(hit) / len(wrong) - 0.5) < 0.06
    # shift: only wrong solutions, the first error moved by exactly one step, still a prefix labelling
    wrong = [r for r in by_dom["shift"] if r["outcome"] == 0.0]
    assert not any(r["meta"]["corrupted"] for r in by_dom["shift"] if r["outcome"] == 1.0)
    hit = [r for r in wrong if r["meta"]["corrupted"]]
    for r in hit:
        fe = r["labels"].index(0.0)
        assert abs(fe - r["meta"]["first_error"]) == 1
        assert r["labels"] == prefix_labels(fe, len(r["steps"]))
    assert abs(len(hit) / len(wrong) - 0.5) < 0.06


def test_corrupt_leaves_clean_kinds_alone():
    rng = random.Random(0)
    assert R.corrupt([1.0, 0.0, 0.0], "none", 0.9, rng) == [1.0, 0.0, 0.0]
    assert R.corrupt([1.0, 1.0], "optimistic", 1.0, rng) == [1.0, 1.0]
    assert R.corrupt([1.0, 1.0], "shift", 1.0, rng) == [1.0, 1.0]


def test_bad_options_are_reported_together(capsys):
    with pytest.raises(SystemExit):
        R.main(["--domains", "a,b", "--kinds", "none,bogus", "--rates", "0,2", "--methods", "x"])
    err = capsys.readouterr().err
    assert "bogus" in err and "--rates" in err and "--methods" in err


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_the_table(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/reweighting.py", "--seeds", "0", "--methods",
           "baseline,instance_table,domain_table,transfer", "--transfer_method", "instance_table",
           "--proxy_hidden", "16",
           "--domains", "a,b", "--kinds", "none,flip", "--rates", "0,0.4", "--n_train", "16", "--n_meta", "8",
           "--n_test", "16", "--n_bon_groups", "4", "--bon_n", "3", "--epochs", "1", "--batch_size", "4",
           "--meta_batch_size", "2", "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
           "--eval_every", "4", "--ckpt_every", "4", "--work_dir", str(tmp_path / "work"), "--out", str(out),
           "--artifacts", str(tmp_path / "art"), "--headline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["main.png", "results.md"]  # what gets committed
    art = tmp_path / "art"
    res = json.loads((art / "results.json").read_text())
    assert set(res["table"]) == {"baseline", "instance_table", "domain_table", "transfer", "proxy"}
    # transfer trains with the proxy's weights: the same weights, another PRM
    runs = res["runs"]
    assert runs["transfer"]["0"]["domain_weight"] == runs["proxy"]["0"]["domain_weight"]
    assert runs["transfer"]["0"]["step_auroc"] != runs["proxy"]["0"]["step_auroc"]
    assert runs["transfer"]["0"]["wall_s"] > runs["proxy"]["0"]["wall_s"] > 0  # the proxy's time is in it
    for t in res["table"].values():
        assert 0.0 <= t["step_auroc"]["mean"] <= 1.0 and t["step_auroc"]["n"] == 1
    assert res["table"]["baseline"]["weight_auroc"]["mean"] == 0.5
    assert set(res["runs"]["domain_table"]["0"]["domain_over_time"]) == {"a", "b"}
    md = (out / "results.md").read_text()
    assert "| instance_table |" in md and "step AUROC" in md and f"`{art}/`" in md
    assert "transfer - instance_table on this PRM" in md and "proxy: hidden 16, 1 layer" in md
    assert sorted(f.name for f in art.iterdir()) == ["domain_weights.png", "learning_curves.png", "main.png",
                                                     "results.json", "weights_by_kind.png"]
    assert (out / "main.png").read_bytes() == (art / "main.png").read_bytes()
    assert all(f.stat().st_size > 0 for f in art.iterdir())
    # --plot_only regenerates the ignored output from the finished runs alone
    for f in art.iterdir():
        f.unlink()
    p = subprocess.run(cmd + ["--plot_only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((art / "results.json").read_text())["table"] == res["table"]
    assert (art / "learning_curves.png").stat().st_size > 0


def test_regenerated_output_goes_to_the_ignored_folder():
    """A committed --out under bench/ keeps results.md; its JSON and figures go to bench/out/ (ignored)."""
    assert R.artifacts_dir(ROOT / "bench" / "reweighting" / "swap_sub") == ROOT / "bench/out/reweighting/swap_sub"
    assert R.artifacts_dir(ROOT / "bench" / "out" / "x") == ROOT / "bench" / "out" / "x"
    assert R.artifacts_dir(Path("/elsewhere/res")) == Path("/elsewhere/res")
    args = R.build_parser().parse_args([])
    assert args.out == ROOT / "bench" / "reweighting" and args.artifacts is None and not args.headline
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/reweighting/results.json"], cwd=ROOT)
    assert ignored.returncode == 0, "bench/out/ must be in .gitignore"


def test_blind_sub_corrupts_only_subtraction_slips(tmp_path):
    a = args_for("--domains", "x", "--kinds", "blind_sub", "--rates", "0.5", "--n_train", "1500")
    rows = R.read_jsonl(R.generate(a, 4, tmp_path)["train"])
    sub = [r for r in rows if r["outcome"] == 0.0 and r["steps"][r["meta"]["first_error"]].split()[1] == "-"]
    assert all(not r["meta"]["corrupted"] for r in rows if r not in sub)
    hit = [r for r in sub if r["meta"]["corrupted"]]
    assert all(r["labels"] == [1.0] * len(r["steps"]) for r in hit)
    assert abs(len(hit) / len(sub) - 0.5) < 0.08


def test_swap_sub_judges_subtractions_inverted_and_changes_the_label_ranking(tmp_path):
    a = args_for("--domains", "x", "--kinds", "swap_sub", "--rates", "1", "--n_train", "400")
    rows = R.read_jsonl(R.generate(a, 5, tmp_path)["train"])
    correct_marked_wrong = wrong_marked_right = 0
    for r in rows:
        judged_ok = [R.check_step(s) != (s.split()[1] == "-") for s in r["steps"]]
        k = judged_ok.index(False) if False in judged_ok else len(r["steps"])
        assert r["labels"] == prefix_labels(k if k < len(r["steps"]) else -1, len(r["steps"]))
        assert r["meta"]["corrupted"] == (r["labels"] != r["meta"]["true_labels"])
        for y, t in zip(r["labels"], r["meta"]["true_labels"]):
            correct_marked_wrong += t == 1.0 and y == 0.0
            wrong_marked_right += t == 0.0 and y == 1.0
    # both directions: some correct steps look worse than some wrong ones
    assert correct_marked_wrong > 100 and wrong_marked_right > 20
    additions_only = [r for r in rows if all(s.split()[1] == "+" for s in r["steps"])]
    assert additions_only and not any(r["meta"]["corrupted"] for r in additions_only)
