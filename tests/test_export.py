"""Scores of a 2-rank ZeRO-3 LoRA run: run dir vs exported merged vs adapter, in-training eval, bad input.

One trained run is shared by every test here (about 30 s on 2 CPU cores).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamprm import cli
from dreamprm import metrics as M
from dreamprm.config import Config
from dreamprm.data.readers import load_records
from dreamprm.data.record import Record, write_jsonl
from dreamprm.data.tokenize import domain_table
from dreamprm.model import PRM_ARCH, build_prm
from dreamprm.scoring import Scorer, ScoringError, _model_config, load_scorer
from dreamprm.train_eval import eval_step_metrics, load_eval_examples

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
DEMO_META = ROOT / "dreamprm" / "demo" / "meta.jsonl"
TAG = "<extra_0>"
ATOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The acceptance command, plus 5 eval records every 2 updates and a checkpoint at update 2."""
    tmp = tmp_path_factory.mktemp("export")
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text("".join(DEMO_META.read_text().splitlines(keepends=True)[:5]))  # 5: a padded shard
    out = tmp / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--mode", "lora", "--precision", "fp32",
           "--lora_dropout", "0", "--batch_size", "2", "--meta_batch_size", "2", "--total_steps", "3",
           "--disable_wandb", "--output_dir", str(out),
           "--eval_file", str(eval_file), "--eval_every", "2", "--save_every", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    # no known-harmless third-party warning on every run (DeepSpeed's deprecated collectives, peft)
    assert "FutureWarning" not in p.stderr and "is deprecated" not in p.stderr, p.stderr[-3000:]
    assert "WARNING" not in p.stderr and "Loading weights" not in p.stderr, p.stderr[-3000:]
    return out, eval_file


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    assert cli.main(["export", str(run[0]), str(out / "merged")]) == 0
    assert cli.main(["export", str(run[0]), str(out / "adapter"), "--adapter"]) == 0
    return out / "merged", out / "adapter"


@pytest.fixture(scope="module")
def recs():
    return load_records(DEMO_META, "minif2f")[:12]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))


def test_run_dir_merged_and_adapter_scores_agree_and_differ_from_untrained(run, exported, recs):
    merged, adapter = exported
    from_run = load_scorer(run[0]).score_records(recs, 4)
    from_merged = load_scorer(merged).score_records(recs, 4)
    from_adapter = load_scorer(adapter).score_records(recs, 3)
    assert max_diff(from_run, from_merged) <= ATOL
    assert max_diff(from_run, from_adapter) <= ATOL
    # the model as training started: same config and seed, nothing learnt
    cfg = torch.load(run[0] / "checkpoints" / "step_00000003" / "dreamprm_state.pt", weights_only=True)["config"]
    torch.manual_seed(cfg["train"]["seed"])
    prm, tok = build_prm(_model_config(cfg), "fp32")
    untrained = Scorer(prm, tok, TAG, device="cpu").score_records(recs, 4)
    assert max_diff(from_run, untrained) > 1e-3


def test_export_layout(exported):
    merged, adapter = exported
    conf = json.loads((merged / "config.json").read_text())
    assert conf["architectures"] == [PRM_ARCH] and conf["dreamprm_step_tag"] == TAG and conf["num_labels"] == 2
    keys = set(load_file(str(merged / "model.safetensors")))
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= keys
    assert all(k.startswith(("model.", "score.")) for k in keys)
    assert not any("lora" in k or "base_layer" in k or "base_model" in k for k in keys)
    assert (merged / "tokenizer_config.json").is_file()
    info = json.loads((merged / "dreamprm.json").read_text())
    assert (info["form"], info["step"], info["step_tag"], info["chat_template"]) == ("merged", 3, TAG, True)
    assert info["max_length"] == 512 and load_scorer(merged).max_length == 512  # the demo's, which trained it
    ad = load_file(str(adapter / "adapter_model.safetensors"))  # peft #453: empty tensors under ZeRO-3
    assert ad and all(v.numel() > 0 for v in ad.values())
    assert any("lora_B" in k for k in ad) and all(v.abs().sum() > 0 for k, v in ad.items() if "lora_B" in k)
    with safe_open(str(adapter / "score.safetensors"), "pt") as sf:
        assert sf.metadata()["step_tag"] == TAG
    assert Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]).is_dir()
    mask = os.umask(0)
    os.umask(mask)
    for f in [*merged.iterdir(), *adapter.iterdir()]:  # model.safetensors was 0600, every other file 0644
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_an_export_folder_is_sealed_with_the_usual_permissions(tmp_path):
    from dreamprm.export import seal
    (tmp_path / "sub").mkdir(mode=0o700)
    for name in ("model.safetensors", "sub/x.json"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
    old = os.umask(0o022)
    try:
        seal(tmp_path)
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (tmp_path / "model.safetensors", tmp_path / "sub" / "x.json",
                                                    tmp_path / "sub")] == ["0o644", "0o644", "0o755"]


def test_merged_export_carries_a_usage_card_whose_snippets_run(exported, recs):
    """README.md in the merged folder: the right tag id, and its input and transformers snippets, run as
    written, give training's token ids and load_scorer's scores."""
    from dreamprm.data.tokenize import encode_records

    merged = exported[0]
    card = (merged / "README.md").read_text()
    scorer = load_scorer(merged)
    tid = scorer.tokenizer.convert_tokens_to_ids(TAG)
    assert json.loads((merged / "config.json").read_text())["dreamprm_step_tag_id"] == tid
    assert f"step tag: `{TAG}`, token id **{tid}**" in card and "151651" in card  # vLLM's default, the pitfall
    assert f'dtype="float32", pooler_config=PoolerConfig(step_tag_id={tid}))' in card
    assert f"--pooler-config '{{\"step_tag_id\": {tid}}}'" in card
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 4 and "load_scorer(MODEL)" in blocks[1] and "trust_remote_code=True" in blocks[2]
    ns = {}
    exec(blocks[0], ns)  # the input recipe
    assert ns["MODEL"] == str(merged.resolve())
    examples, _ = encode_records(recs, scorer.tokenizer, TAG, 10**6, True)
    ref = scorer.score_records(recs, 4)
    exec("\n".join(blocks[2].splitlines()[:-1]), ns)  # the transformers snippet, less its last line
    for ex, rec in zip(examples, recs):
        ids = ns["prm_input"](rec.question, rec.steps)
        assert ids == ex.input_ids
        got = ns["model"].step_scores(torch.tensor([ids]))[0]
        assert max(abs(a - b) for a, b in zip(got, ref[rec.id], strict=True)) <= ATOL


def test_usage_card_for_a_plain_prompt_and_another_backbone():
    """No chat template, a custom profile, a backbone without a PRM class or modeling file: the card says so."""
    from dreamprm.export import usage_card

    info = {"step_tag": "<s_t>", "checkpoint": "/r/checkpoints/step_00000007", "step": 7, "mode": "lora",
            "max_length": 256, "chat_template": False, "profile": "problem_solution",
            "profiles": {"problem_solution": {"name": "problem_solution", "chat": False, "system": "",
                                              "template": "Problem: {question}\nSolution:"}}}
    conf = {"dreamprm_step_tag_id": 9, "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]}
    card = usage_card(Path("/out/prm"), conf, info, tokenizer=None)
    assert "token id **9**" in card and "STEP_TAG_ID = 9  # <s_t>" in card and "MODEL = \"/out/prm\"" in card
    assert 'ids = tok("Problem: {question}\\nSolution:".replace("{question}", question) + "\\n").input_ids' in card
    assert "apply_chat_template" not in card and "PoolerConfig" not in card and "trust_remote_code" not in card
    assert "Not servable as a PRM" in card and "load the folder with dreamprm" in card


def test_merged_export_gives_the_same_scores_in_plain_transformers(exported, recs):
    """What a user without dreamprm does: AutoModel with trust_remote_code, the step tag from config.json."""
    from transformers import AutoModel, AutoTokenizer

    from dreamprm.data.tokenize import encode_records

    merged = exported[0]
    scorer = load_scorer(merged)
    ref = scorer.score_records(recs, 4)
    model = AutoModel.from_pretrained(merged, trust_remote_code=True, dtype=torch.float32,
                                      local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    assert tok.convert_tokens_to_ids(model.config.dreamprm_step_tag) == model.config.dreamprm_step_tag_id
    examples, _ = encode_records(recs, tok, TAG, 10**6, True)
    for ex in examples:
        got = model.step_scores(torch.tensor([ex.input_ids]))[0]
        assert len(got) == len(ref[ex.id])
        assert max(abs(a - b) for a, b in zip(got, ref[ex.id])) <= ATOL


def test_in_training_eval_equals_the_checkpoint_scored_offline(run):
    """The live 2-rank ZeRO-3 model (sharded eval, padded shard) against its consolidated checkpoint."""
    out, eval_file = run
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # step 2 is an eval step: a row although log_every is 20
    assert not any(k.startswith("eval_") for k in rows[1])
    live = {k: v for k, v in rows[0].items() if k.startswith("eval_")}
    assert set(live) == {"eval_loss", "eval_step_auroc", "eval_f1", "eval_ece", "eval_labelled_steps"}
    assert live["eval_labelled_steps"] == 15
    s = load_scorer(out, checkpoint="step_2")
    cfg = Config()
    cfg.data.eval_file, cfg.data.max_length = str(eval_file), 512
    ex, _ = load_eval_examples(cfg, s.tokenizer, domain_table([]))
    with torch.no_grad():
        offline = eval_step_metrics(s._forward, ex, batch_size=4, pad_id=s.pad_id)
    assert offline == pytest.approx(live, abs=ATOL)


def test_export_of_a_named_checkpoint(run, exported, recs, tmp_path):
    assert cli.main(["export", str(run[0]), str(tmp_path / "s2"), "--checkpoint", "step_00000002"]) == 0
    assert json.loads((tmp_path / "s2" / "dreamprm.json").read_text())["step"] == 2
    at2 = load_scorer(tmp_path / "s2").score_records(recs)
    assert max_diff(at2, load_scorer(run[0] / "checkpoints" / "step_00000002").score_records(recs)) <= ATOL
    assert max_diff(at2, load_scorer(exported[0]).score_records(recs)) > 1e-4


def test_evaluate_steps_with_the_run_dir_as_model(run, tmp_path, capsys):
    out, eval_file = run
    saved = tmp_path / "scores" / "s.jsonl"
    rc = cli.main(["evaluate", "steps", "--data", str(eval_file), "--model", str(out), "--out",
                   str(tmp_path / "r.json"), "--save_scores", str(saved)])
    assert rc == 0, capsys.readouterr().err
    assert "step AUROC" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    recs = load_records(eval_file)
    scores = load_scorer(out).score_records(recs)
    pairs = [(p, y) for r in recs for p, y in zip(scores[r.id], r.labels) if y is not None]
    assert report["metrics"]["auroc"] == pytest.approx(M.auroc(*zip(*pairs)), abs=1e-6)
    assert report["metrics"]["n_labelled_steps"] == 15
    # the saved scores are what --scores reads, and give the same report
    assert [json.loads(line)["id"] for line in saved.read_text().splitlines()] == [r.id for r in recs]
    rc = cli.main(["evaluate", "steps", "--data", str(eval_file), "--scores", str(saved), "--out",
                   str(tmp_path / "r2.json")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r2.json").read_text())["metrics"] == report["metrics"]
    # plain dicts (the internal JSONL form) score like Records
    scorer = load_scorer(out)
    assert scorer.score_records([r.to_json() for r in recs]) == scores
    with pytest.raises(ScoringError, match=r"records\[1\]: missing steps"):
        scorer.score_records([recs[0].to_json(), {"id": "x", "question": "q"}])
    with pytest.raises(ScoringError, match="expected a dreamprm Record or a dict"):
        scorer.score_records([("q", ["s"])])


def test_evaluate_max_length_cut_or_skip_counted_and_listed(run, tmp_path, capsys):
    """At --max_length 112 one eval solution (111 tokens) fits and four (113-115) are cut after 2 steps."""
    out, eval_file = run
    base = ["evaluate", "steps", "--data", str(eval_file), "--model", str(out), "--max_length", "112"]
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert "4 solution(s) do not fit in max_length 112" in err and "--too-long" in err
    full = load_scorer(out).score_records(load_records(eval_file))
    assert cli.main([*base, "--too-long", "cut", "--out", str(tmp_path / "cut.json"),
                     "--save-scores", str(tmp_path / "cut.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "max_length 112 (model limit 1024)" in text
    assert "4 of 5 solutions cut at a step boundary, 0 skipped" in text and "meta-0001 (2/3)" in text
    report = json.loads((tmp_path / "cut.json").read_text())
    assert report["inputs"]["max_length"] == 112
    assert report["inputs"]["too_long"]["cut"] == {f"meta-000{i}": [2, 3] for i in range(1, 5)}
    assert report["metrics"]["n_labelled_steps"] == 3 + 4 * 2
    cut = {json.loads(ln)["id"]: json.loads(ln)["scores"] for ln in (tmp_path / "cut.jsonl").read_text().splitlines()}
    for rid, s in cut.items():  # a cut solution's scores are the first scores of the whole one (causal model)
        assert s == pytest.approx(full[rid][:len(s)], abs=ATOL)
    assert cli.main([*base, "--too-long", "skip", "--out", str(tmp_path / "skip.json")]) == 0
    assert "0 of 5 solutions cut at a step boundary, 4 skipped" in capsys.readouterr().out
    report = json.loads((tmp_path / "skip.json").read_text())
    assert report["inputs"]["too_long"]["skipped"] == [f"meta-000{i}" for i in range(1, 5)]
    assert report["metrics"]["n_labelled_steps"] == 3


def export_err(capsys, *args) -> str:
    assert cli.main(["export", *map(str, args)]) == 1
    return capsys.readouterr().err


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("LOCK"))
    return to


def test_incomplete_runs_are_refused(run, tmp_path, capsys):
    fresh = tmp_path / "fresh"  # started, no checkpoint yet
    fresh.mkdir()
    shutil.copy(run[0] / "config.yaml", fresh / "config.yaml")
    err = export_err(capsys, fresh, tmp_path / "o1")
    assert "has no complete checkpoint" in err and "checkpoints/latest is missing" in err

    r = copy_run(run[0], tmp_path / "r")
    ck = r / "checkpoints"
    (ck / "step_00000003" / "MANIFEST.json").unlink()  # interrupted save
    # `latest` names the interrupted save: the newest complete checkpoint is exported, saying so
    assert cli.main(["export", str(r), str(tmp_path / "o1b")]) == 0
    err = capsys.readouterr().err
    assert "names step_00000003, which is incomplete: using step_00000002" in err
    assert json.loads((tmp_path / "o1b" / "dreamprm.json").read_text())["step"] == 2
    err = export_err(capsys, r / "checkpoints" / "step_00000003", tmp_path / "o2")
    assert "step_00000003 is incomplete (no MANIFEST.json" in err
    err = export_err(capsys, r, tmp_path / "o2", "--checkpoint", "7")
    assert "no checkpoint '7'" in err and "step_00000002, step_00000003 (partial: no MANIFEST.json)" in err
    assert cli.main(["export", str(r), str(tmp_path / "o2"), "--checkpoint", "2"]) == 0  # the complete one

    (ck / "latest").unlink()
    os.replace(ck / "step_00000003", ck / "step_00000003.tmp")
    shutil.rmtree(ck / "step_00000002")
    err = export_err(capsys, r, tmp_path / "o3")
    assert "no complete checkpoint" in err and "step_00000003.tmp (partial: no MANIFEST.json)" in err

    d = copy_run(run[0], tmp_path / "d")
    shard = d / "checkpoints" / "step_00000003" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged
    err = export_err(capsys, d, tmp_path / "o4")
    assert "is damaged" in err and "zero_pp_rank_1_mp_rank_00_model_states.pt" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 3, 4))


def test_export_refuses_a_used_out_dir_and_a_model_folder(run, exported, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    err = export_err(capsys, run[0], tmp_path / "busy")
    assert "exists and is not empty" in err and (tmp_path / "busy" / "x").read_text() == "keep"
    err = export_err(capsys, exported[0], tmp_path / "again")
    assert "is a model folder" in err


def test_model_folder_without_step_tag(exported, recs, tmp_path, capsys):
    merged = tmp_path / "m"
    shutil.copytree(exported[0], merged)
    conf = json.loads((merged / "config.json").read_text())
    del conf["dreamprm_step_tag"]
    (merged / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ScoringError, match="does not record its step tag.*dreamprm_step_tag"):
        load_scorer(merged)
    write_jsonl(recs[:2], tmp_path / "d.jsonl")
    assert cli.main(["evaluate", "steps", "--data", str(tmp_path / "d.jsonl"), "--model", str(merged)]) == 1
    assert "does not record its step tag" in capsys.readouterr().err
    ref = load_scorer(exported[0]).score_records(recs[:2])  # told the tag, it loads
    assert max_diff(load_scorer(merged, step_tag=TAG).score_records(recs[:2]), ref) == 0.0
    with pytest.raises(ScoringError, match="records step tag '<extra_0>', not '<x>'"):
        load_scorer(exported[0], step_tag="<x>")

    adapter = tmp_path / "a"
    shutil.copytree(exported[1], adapter)
    head = load_file(str(adapter / "score.safetensors"))
    save_file(head, str(adapter / "score.safetensors"))  # no metadata
    with pytest.raises(ScoringError, match="does not record its step tag \\(score.safetensors metadata\\)"):
        load_scorer(adapter)


def test_scores_that_do_not_match_the_data_or_the_model(run, exported, recs, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(recs[:3], data)
    scores = load_scorer(exported[0]).score_records(recs[1:4])  # scored on other records
    with open(tmp_path / "s.jsonl", "w") as f:
        for rid, s in scores.items():
            f.write(json.dumps({"id": rid, "scores": s}) + "\n")
    assert cli.main(["evaluate", "steps", "--data", str(data), "--scores", str(tmp_path / "s.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"id {recs[3].id!r} is not in the data" in err and f"1 of 3 records have no scores: {recs[0].id!r}" in err
    long = Record(id="long", question="q", steps=["1 + 1 = 2. " * 300], labels=[1.0])  # > 1024 positions
    write_jsonl([long], data)
    assert cli.main(["evaluate", "steps", "--data", str(data), "--model", str(run[0])]) == 1
    # the default is the model's limit (1024), not the length the run trained with (512): issue 24, item 9
    err = capsys.readouterr().err
    assert "do not fit in max_length 1024" in err and "--max-length" in err
