"""Several sources in one run (issue 13): exact 2-rank resume with mixing + curriculum, bad input reported
at once, per-source metrics, and prompt profiles from training to load_scorer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamprm.data.readers import load_records
from dreamprm.data.record import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = ["launch/train.py", "--mode", "lora", "--lora_dropout", "0", "--precision", "fp32", "--batch_size", "2",
         "--meta_batch_size", "2", "--log_every", "1", "--disable_wandb"]


def run(cmd, check=True, timeout=600):
    p = subprocess.run([*map(str, cmd)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def three_sources(tmp: Path) -> list[str]:
    """The demo training data split into three sources (dreamprm format) with a meta.difficulty each."""
    recs = load_records(ROOT / "dreamprm/demo/train.jsonl", "minif2f")
    specs = []
    for k, name in enumerate(("alpha", "beta", "gamma")):
        part = recs[k::3]
        for i, r in enumerate(part):
            r.domain, r.meta = None, {"difficulty": (i * 7) % 11}
        write_jsonl(part, tmp / f"{name}.jsonl")
        specs.append(f"{tmp / name}.jsonl,format=dreamprm,weight={k + 1}")
    return specs


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_epoch_with_learned_mixing_and_curriculum_is_exact_on_two_ranks(tmp_path):
    src = [a for s in three_sources(tmp_path) for a in ("--train_file", s)]
    flags = TRAIN + src + ["--meta_file", ROOT / "dreamprm/demo/meta.jsonl", "--meta_format", "minif2f",
                           "--mix", "learned", "--weights", "domain_table", "--meta_lr", "0.5",
                           "--curriculum", "difficulty", "--curriculum_steps", "4", "--save_every", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(TORCHRUN + flags + ["--total_steps", "6", "--output_dir", straight])
    run(TORCHRUN + flags + ["--total_steps", "3", "--output_dir", split])
    p = run(TORCHRUN + flags + ["--total_steps", "6", "--output_dir", split])
    assert "resumed from" in p.stdout
    ma, mb = metrics(straight), metrics(split)
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == [1, 2, 3, 4, 5, 6]
    keys = [k for k in ma[-1] if k.startswith("src/")]
    assert {"src/alpha/n", "src/beta/p", "src/gamma/loss"} <= set(keys)
    for a, b in zip(ma, mb):
        assert [k for k in a if k.startswith("src/")] == [k for k in b if k.startswith("src/")]
        for key in ["loss", "meta_loss", "w_mean", "w_std", *[k for k in a if k.startswith("src/")]]:
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    probs = [[r[f"src/{n}/p"] for n in ("alpha", "beta", "gamma")] for r in ma]
    assert probs[0] != probs[-1]  # the learned domain weights moved the sampling probabilities
    assert sum(sum(r[f"src/{n}/n"] for n in ("alpha", "beta", "gamma")) for r in ma) == 6 * 2 * 2
    status = json.loads((split / "status.json").read_text())
    assert sum(status["sources"][f"src/{n}/n"] for n in ("alpha", "beta", "gamma")) == 24  # totals span the resume


def test_bad_sources_are_all_reported_at_once_before_any_model(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    outcome_only = [{"schema": 1, "id": f"o{i}", "question": "q", "steps": ["a", "b"], "labels": [None, None],
                     "outcome": 1.0} for i in range(3)]
    labelled = [{"schema": 1, "id": f"l{i}", "question": "q", "steps": ["a", "b"], "labels": [1.0, 0.0]}
                for i in range(3)]
    (tmp_path / "outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in outcome_only))
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    p = run([sys.executable, "launch/train.py", "--train_format", "dreamprm", "--meta_format", "dreamprm",
             "--train_file", tmp_path / "empty.jsonl", "--train_file", tmp_path / "outcomes.jsonl",
             "--train_file", f"{tmp_path / 'labels.jsonl'},weight=nan,profile=fancy",
             "--train_file", f"{tmp_path / 'labels.jsonl'},name=again,weight=-2",
             "--meta_file", tmp_path / "labels.jsonl", "--output_dir", tmp_path / "run"], check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    want = [("--train_file", "labels.jsonl", "weight=nan"), ("--train_file", "labels.jsonl", "weight=-2"),
            ("--train_file", "labels.jsonl", "profile='fancy'"), ("--train_file", "empty.jsonl", "no records"),
            ("--train_file", "outcomes.jsonl", "no step labels"),
            ("--meta_file", "labels.jsonl", "no record has an outcome label")]
    for parts in want:
        assert sum(all(x in ln for x in parts) for ln in lines) == 1, (parts, p.stderr)
    assert "Loading weights" not in p.stderr and not (tmp_path / "run").exists()


def test_a_prompt_profile_round_trips_from_training_to_load_scorer(tmp_path):
    from dreamprm.config import load_config
    from dreamprm.data.tokenize import Profile, encode_records
    from dreamprm.model import load_tokenizer
    from dreamprm.scoring import load_scorer
    from dreamprm.tiny import default_tiny_dir
    from dreamprm.data.sources import run_data

    out = tmp_path / "run"
    flags = ["--train_file", f"{ROOT / 'dreamprm/demo/train.jsonl'},profile=custom", "--train_format", "minif2f",
             "--meta_file", ROOT / "dreamprm/demo/meta.jsonl", "--meta_format", "minif2f",
             "--system_prompt", "You grade proofs.", "--prompt_template", "Theorem to prove:\n{question}\nProof:",
             "--profile", "custom", "--total_steps", "2", "--output_dir", out]
    run([sys.executable, *TRAIN, *flags])
    scorer = load_scorer(out, device="cpu")
    want = Profile("custom", True, "You grade proofs.", "Theorem to prove:\n{question}\nProof:")
    assert scorer.profile == want
    # the scorer renders a record exactly as training did
    cfg, _ = load_config([*map(str, TRAIN[1:]), *map(str, flags)])
    tok = load_tokenizer(default_tiny_dir(), cfg.model.step_tag, False)
    train_ex = run_data(cfg, tok, 0, needs_meta=False).train_ex
    recs = load_records(ROOT / "dreamprm/demo/train.jsonl", "minif2f")[:3]
    mine, _ = encode_records(recs, scorer.tokenizer, scorer.step_tag, 4096, scorer.chat_template,
                             profile=scorer.profile)
    assert [e.input_ids for e in mine] == [e.input_ids for e in train_ex[:3]]
    plain, _ = encode_records(recs, scorer.tokenizer, scorer.step_tag, 4096, scorer.chat_template)
    assert plain[0].input_ids != mine[0].input_ids  # the profile did change the rendering
    assert "Theorem to prove" in scorer.tokenizer.decode(mine[0].input_ids)
    # and through an export
    from dreamprm.export import export
    exported = export(out, tmp_path / "exported")
    info = json.loads((exported / "dreamprm.json").read_text())
    assert info["profile"] == "custom" and info["profiles"]["custom"]["system"] == "You grade proofs."
    assert load_scorer(exported, device="cpu").profile == want
    with pytest.raises(Exception, match="records the prompt profiles"):
        load_scorer(out, device="cpu", profile="problem_solution")
    s = scorer.score(recs[0].question, recs[0].steps)
    assert len(s) == len(recs[0].steps) and all(0 < x < 1 for x in s)
    assert torch.isfinite(torch.tensor(s)).all()


REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "processbench" / "gsm8k.json").is_file(), reason="needs ../shared/realdata")
def test_the_mix_recipe_runs_as_a_cpu_smoke(tmp_path):
    """recipes/mix.yaml from the repository root: four real sources, learned-domain sampling, 2 updates."""
    out = tmp_path / "run"
    p = run([sys.executable, "launch/train.py", "--config", "recipes/mix.yaml", "--total_steps", "2",
             "--output_dir", out], timeout=900)
    assert "positive fraction" in p.stdout and "per source over the run" in p.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    names = {k.split("/")[1] for k in rows[-1] if k.startswith("src/")}
    assert names == {"gsm8k", "math", "omnimath", "samples_prm800k"}
    assert abs(sum(rows[-1][f"src/{n}/p"] for n in names) - 1) < 1e-9
