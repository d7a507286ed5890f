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
import torch

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
            # a right final answer with wrong steps: only the hard best-of-N candidates (--bon_hard)
            assert r["outcome"] == (1.0 if fe == -1 or r["meta"].get("hard") else 0.0)
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


# ---------------------------------------------------------------- the labellers of issue 23


def test_late_judges_the_first_wrong_step_right():
    rng = random.Random(0)
    assert R.corrupt([1.0, 1.0, 0.0, 0.0], "late", 1.0, rng) == [1.0, 1.0, 1.0, 0.0]
    assert R.corrupt([0.0, 0.0, 0.0], "late", 1.0, rng) == [1.0, 0.0, 0.0]
    assert R.corrupt([1.0, 1.0, 0.0], "late", 1.0, rng) == [1.0, 1.0, 1.0]  # slip in the last step: all 1
    assert R.corrupt([1.0, 1.0, 1.0], "late", 1.0, rng) == [1.0, 1.0, 1.0]  # a right solution is left alone
    assert R.corrupt([1.0, 0.0], "late", 0.0, rng) == [1.0, 0.0]


def test_outcome_labels_every_step_with_the_final_answer():
    rng = random.Random(0)
    assert R.corrupt([1.0, 1.0, 0.0, 0.0], "outcome", 1.0, rng) == [0.0] * 4
    assert R.corrupt([1.0, 1.0, 1.0], "outcome", 1.0, rng) == [1.0] * 3
    # two compensating slips: the answer is right, so every step is marked right
    assert R.corrupt([1.0, 0.0, 0.0], "outcome", 1.0, rng, outcome=1.0) == [1.0] * 3


def test_mc_soft_labels_are_rollout_fractions():
    rng = random.Random(0)
    n = 6
    rows = [R.corrupt([1.0] * 3 + [0.0] * (n - 3), "mc_soft", 1.0, rng, mc_rollouts=8, mc_skill=0.8)
            for _ in range(2000)]
    for y in rows:
        assert all(0.0 <= v <= 1.0 and (v * 8).is_integer() for v in y)
        assert y[3:] == [0.0] * (n - 3)  # a prefix that holds the slip never reaches the right answer
    # a correct prefix: the completer has to get the n - 1 - k remaining steps right, each with p 0.8; the mean
    # of 2000 x 8 Bernoulli draws is within 4 standard errors (sd <= 0.5 / sqrt(16000) ~ 0.004) of 0.8 ** left
    for k in range(3):
        mean = sum(y[k] for y in rows) / len(rows)
        assert abs(mean - 0.8 ** (n - 1 - k)) < 0.02
        assert mean < 1.0
    # a right solution: the last step's prefix is the whole solution, so it is 1; earlier ones below 1
    y = R.corrupt([1.0] * 5, "mc_soft", 1.0, random.Random(1), mc_rollouts=8, mc_skill=0.8)
    assert y[-1] == 1.0
    # a compensated slip puts a later prefix back on track: its completions can reach the right answer
    y = R.corrupt([1.0, 0.0, 0.0, 0.0], "mc_soft", 1.0, random.Random(2), on_track=[True, False, True, True],
                  mc_skill=1.0)
    assert y == [1.0, 0.0, 1.0, 1.0]


def test_new_kinds_in_the_generator(tmp_path):
    a = args_for("--domains", "o,l,m", "--kinds", "outcome,late,mc_soft", "--rates", "1,1,1", "--n_train", "300")
    rows = R.read_jsonl(R.generate(a, 6, tmp_path)["train"])
    for r in rows:
        y, t = r["labels"], r["meta"]["true_labels"]
        assert r["meta"]["corrupted"] == (y != t)
        if r["domain"] == "o":
            assert y == [r["outcome"]] * len(t)
        elif r["domain"] == "l":
            fe = r["meta"]["first_error"]
            assert y == (t if fe == -1 else prefix_labels(fe + 1 if fe + 1 < len(t) else -1, len(t)))
        else:
            assert all(0 <= v <= 1 for v in y) and all(v == 0 for v, tv in zip(y, t) if tv == 0)
    soft = [v for r in rows if r["domain"] == "m" for v in r["labels"] if 0 < v < 1]
    assert len(soft) > 100


def test_soft_labels_reach_the_loss_as_floats():
    """dreamprm's reader keeps mc_soft's labels as they are (float32), and the default step loss is the soft
    cross-entropy: the loss of label 0.375 is not that of 0 or 1."""
    from dreamprm.data.loader import collate
    from dreamprm.data.record import record_from_json, record_problems
    from dreamprm.data.tokenize import Example
    from dreamprm.hypergrad import instance_losses

    rec = record_from_json({"id": "x", "question": "q", "steps": ["1 + 2 = 3", "3 + 2 = 5"], "labels": [0.375, 1.0]})
    assert record_problems(rec) == [] and rec.labels == [0.375, 1.0]
    losses = []
    for y in (0.0, 0.375, 1.0):
        ex = Example(input_ids=[5, 6, 7, 8], tag_pos=[1, 3], labels=[y, 1.0], outcome=1.0, index=0, domain=0,
                     n_steps=2, n_kept=2, id="x")
        batch = collate([ex], pad_id=0)
        assert batch["labels"].dtype == torch.float32 and batch["labels"][0, 0].item() == y
        logits = torch.zeros(1, 2, 2)
        logits[0, :, 1] = 1.0  # p(correct) = sigmoid(1) at both steps
        losses.append(instance_losses(logits, batch).item())
    assert losses[0] > losses[1] > losses[2]


# ---------------------------------------------------------------- best-of-N, baselines, configs


def test_hard_best_of_n_candidates_have_the_right_answer_and_wrong_steps(tmp_path):
    a = args_for("--n_bon_groups", "40", "--n_train", "10")
    assert a.bon_hard and a.bon_n == 16
    rows = R.read_jsonl(R.generate(a, 7, tmp_path)["bon"])
    hard = [r for r in rows if r["meta"]["hard"]]
    assert len(hard) > 50
    for r in hard:
        ok = [R.check_step(s) for s in r["steps"]]
        assert r["outcome"] == 1.0 and ok.count(False) == 2 and ok.index(False) == r["meta"]["first_error"]
        truth = r["steps"][-1].split()[-1]
        right = [c for c in rows if c["meta"]["group"] == r["meta"]["group"] and c["meta"]["first_error"] == -1]
        assert all(c["steps"][-1].split()[-1] == truth for c in right)
    off = R.read_jsonl(R.generate(args_for("--n_bon_groups", "40", "--no-bon_hard"), 7, tmp_path / "off")["bon"])
    assert not any(r["meta"]["hard"] for r in off)


def test_hard_frac_makes_right_answers_with_wrong_steps(tmp_path):
    a = args_for("--domains", "x", "--kinds", "outcome", "--rates", "1", "--n_train", "400", "--hard_frac", "0.5")
    rows = R.read_jsonl(R.generate(a, 8, tmp_path)["train"])
    hidden = [r for r in rows if r["outcome"] == 1.0 and r["meta"]["first_error"] != -1]
    assert len(hidden) > 40
    assert all(r["labels"] == [1.0] * len(r["steps"]) and r["meta"]["corrupted"] for r in hidden)


def test_learned_configs_pass_no_meta_pass_setting_by_default(tmp_path):
    files = {k: tmp_path / f"{k}.jsonl" for k in ("train", "train_clean", "train_meta", "meta", "test")}
    a = args_for()
    for m in R.LEARNED:
        meta = R.run_config(a, m, 0, files, tmp_path, tmp_path / m)["meta"]
        assert meta == {"baseline": False, "weights": m}
    a = args_for("--meta_lr", "0.05", "--hypergrad", "finite_diff", "--meta_batch_size", "16")
    for m in R.LEARNED:
        meta = R.run_config(a, m, 0, files, tmp_path, tmp_path / m)["meta"]
        assert meta == {"baseline": False, "weights": m, "meta_lr": 0.05, "hypergrad": "finite_diff",
                        "meta_batch_size": 16}
    assert R.run_config(a, "baseline", 0, files, tmp_path, tmp_path)["meta"] == {"baseline": True,
                                                                               "weights": "instance_table"}
    from dreamprm.config import MetaConfig

    text = R.describe_meta(args_for("--meta_lr", "0.05"))
    assert "meta_lr 0.05 (--meta_lr)" in text and f"hypergrad {MetaConfig().hypergrad}," in text
    assert "meta_batch_size 16 (= --batch_size)," in text  # the default 0, as the runs resolve it
    assert R.run_config(a, "uniform_meta", 0, files, tmp_path, tmp_path)["data"]["train_file"] == str(
        files["train_meta"])


def test_uniform_meta_adds_the_right_answer_meta_records(tmp_path):
    a = args_for("--n_train", "20", "--n_meta", "60")
    files = R.generate(a, 9, tmp_path)
    meta, train = R.read_jsonl(files["meta"]), R.read_jsonl(files["train"])
    extra = R.read_jsonl(files["train_meta"])[len(train):]
    assert R.read_jsonl(files["train_meta"])[:len(train)] == train
    right = [r for r in meta if r["outcome"] == 1.0]
    assert 0 < len(right) < len(meta) and [r["id"] for r in extra] == [r["id"] for r in right]
    assert all(r["labels"] == [1.0] * len(r["steps"]) and r["domain"] == "meta" for r in extra)
    assert not any(r["meta"]["corrupted"] for r in extra)  # one slip: a right answer has no wrong step


def test_within_domain_weight_auroc():
    a = args_for("--domains", "a,b,c", "--kinds", "none,flip,flip", "--rates", "0,0.5,0.5")
    recs = [{"domain": d, "meta": {"corrupted": c}} for d, c in
            [("a", False)] * 3 + [("b", False), ("b", True), ("c", False), ("c", True)]]
    # a domain-level weight: b and c low, a high; inside b and c the corrupted one weighs more. Pooled:
    # of the 5 x 2 clean-corrupted pairs the 6 with a clean a-record are ordered right, the other 4 wrong
    pooled, within = R.weight_aurocs(a, [2.0] * 3 + [0.5, 0.6, 0.5, 0.6], recs)
    assert pooled == pytest.approx(0.6) and within == 0.0
    pooled, within = R.weight_aurocs(a, [1.0] * 7, recs)
    assert pooled == 0.5 and within == 0.5


def test_gap_share_against_the_best_baseline():
    res = {"baseline": {0: {"step_auroc": 0.6, "pb_f1": 0.2, "bon_acc": 0.5}},
           "loss_select": {0: {"step_auroc": 0.8, "pb_f1": 0.1, "bon_acc": 0.5}},
           "oracle": {0: {"step_auroc": 1.0, "pb_f1": 0.6, "bon_acc": 0.5}},
           "instance_table": {0: {"step_auroc": 0.9, "pb_f1": 0.4, "bon_acc": 0.6}}}
    uni = R.gap_shares(res, 0, "baseline")["instance_table"]
    best = R.gap_shares(res, 0, "best")["instance_table"]
    assert uni["step_auroc"] == pytest.approx(0.75) and best["step_auroc"] == pytest.approx(0.5)
    assert uni["pb_f1"] == best["pb_f1"] == pytest.approx(0.5)  # baseline is the best F1
    assert uni["bon_acc"] is None  # no gap to recover
    assert R.gap_shares(res, 0, "best")["loss_select"]["step_auroc"] == pytest.approx(0.0)


def test_cost_line_counts_the_runs(tmp_path):
    a = args_for("--methods", "baseline,transfer,loss_select,instance_table", "--seeds", "0,1", "--n_train", "48",
                 "--epochs", "1", "--work_dir", str(tmp_path))
    # per seed: baseline 1, transfer 2 (proxy, target), loss_select 2 (warm-up, full), instance_table 1
    assert R.cost_line(a).startswith("cost: 12 training runs to launch (12 in all, 0 finished")
    full = R.total_updates(a)
    assert f"{10 * full + 2 * R.warmup_updates(a)} PRM updates" in R.cost_line(a)


def test_new_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        R.main(["--select_drop", "1", "--mc_skill", "2", "--meta_lr", "0", "--domains", "meta,b", "--kinds",
                "flip,flip", "--rates", "0.1,0.1"])
    err = capsys.readouterr().err
    assert all(f in err for f in ("--select_drop", "--mc_skill", "--meta_lr", "'meta'", "oracle"))


@pytest.mark.slow
def test_baselines_end_to_end(tmp_path):
    """uniform_meta trains on the extra meta records; loss_select's 0/1 selection (the warm-up run's highest
    losses weighted 0) is read by --weights_from and is the weights its run trained with. Three runs of 3 updates
    on a 1-layer PRM of width 32."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, "bench/reweighting.py", "--seeds", "0", "--methods", "uniform_meta,loss_select",
           "--domains", "a,b", "--kinds", "none,late", "--rates", "0,1", "--n_train", "6", "--n_meta", "8",
           "--n_test", "8", "--n_bon_groups", "2", "--bon_n", "3", "--epochs", "1", "--batch_size", "4",
           "--select_drop", "0.25", "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
           "--eval_every", "4", "--work_dir", str(work), "--out", str(out), "--jobs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "cost: 3 training runs to launch" in p.stdout
    seed = work / "seed0"
    meta = R.read_jsonl(seed / "data" / "meta.jsonl")
    ids = [r["id"] for r in R.read_jsonl(seed / "uniform_meta" / "instance_weights.jsonl")]
    assert sorted(i for i in ids if i.startswith("meta-")) == sorted(r["id"] for r in meta if r["outcome"] == 1.0)
    chosen = R.read_jsonl(seed / "loss_select-weights" / "instance_weights.jsonl")
    assert sorted(r["weight"] for r in chosen) == [0.0] * 3 + [1.0] * 9  # 0.25 of 12 records
    dropped_loss = min(r["loss"] for r in chosen if r["weight"] == 0.0)
    assert all(r["loss"] <= dropped_loss for r in chosen if r["weight"] == 1.0)
    used = {r["id"]: r["weight"] for r in R.read_jsonl(seed / "loss_select" / "instance_weights.jsonl")}
    assert used == {r["id"]: r["weight"] for r in chosen}
    assert "weights from" in (seed / "loss_select.log").read_text()
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert runs["loss_select"]["0"]["wall_s"] > float((seed / "loss_select" / "wall_s.txt").read_text())
    assert runs["uniform_meta"]["0"]["weight_auroc"] == 0.5
    md = (out / "results.md").read_text()
    assert "Meta pass of the learned methods: hypergrad" in md and "| random pick |" in md


def test_every_usage_example_is_accepted():
    """The commands at the top of the module docstring parse and pass check_args (not run: they are the
    experiments)."""
    import shlex

    text = R.__doc__.split("\n\nThe task.")[0].replace("\\\n", " ")
    cmds = [ln.split("#")[0].split("python bench/reweighting.py", 1)[1] for ln in text.splitlines()
            if "python bench/reweighting.py" in ln]
    assert len(cmds) >= 7
    p = R.build_parser()
    for c in cmds:
        args = p.parse_args(shlex.split(c))
        R.check_args(p, args)
