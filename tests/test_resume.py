"""dreamprm/resume.py: which checkpoint a run resumes from, and what must not change on resume. The
end-to-end resume cases (signals, damage, other rank counts) are in tests/test_train.py, tests/test_faults.py
and tests/test_golden.py."""

import pytest

from dreamprm.config import Config
from dreamprm.errors import CheckpointError
from dreamprm.resume import check_resume_config


def test_checkpoints_from_before_the_mixing_options_resume_and_a_changed_mix_is_refused():
    cfg = Config()
    old = cfg.to_dict()
    for key in ("mix", "curriculum", "profile", "system_prompt", "prompt_template"):
        del old["data"][key]  # a checkpoint written before these options existed
    check_resume_config(cfg, old)
    changed = {**old, "data": {**old["data"], "mix": "temperature"}}
    with pytest.raises(CheckpointError, match="--mix: checkpoint has 'temperature'"):
        check_resume_config(cfg, changed)


@pytest.mark.parametrize("section,key,value", [
    ("model", "lora_alpha", 64), ("model", "lora_r", 8), ("model", "lora_dropout", 0.0),
    ("model", "lora_targets", ["q_proj"]), ("train", "precision", "fp32"), ("model", "chat_template", False),
    ("data", "profile", "plain"), ("model", "step_tag", "<step>"), ("model", "add_step_tag", False),
    ("data", "max_length", 512), ("train", "step_loss", "focal"), ("train", "hard_labels", True),
    ("train", "focal_gamma", 1.0), ("train", "pos_fraction", 0.3), ("model", "mode", "full"),
    ("meta", "net_hidden", 8), ("meta", "table_optimizer", "sgd")])
def test_a_changed_model_or_input_definition_is_refused_naming_the_flag(section, key, value):
    saved = Config().to_dict()
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(CheckpointError, match=f"--{key}: checkpoint has "):
        check_resume_config(cfg, saved)


@pytest.mark.parametrize("section,key,value", [("train", "lr", 1e-3), ("train", "lr_schedule", "cosine"),
                                               ("train", "warmup_steps", 5), ("train", "weight_decay", 0.1),
                                               ("meta", "meta_lr", 0.5)])
def test_an_option_that_would_not_take_effect_on_resume_is_refused(section, key, value):
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(CheckpointError, match=f"--{key}: .*would not take effect"):
        check_resume_config(cfg, Config().to_dict())


def test_options_that_may_change_on_resume_are_accepted():
    cfg = Config()
    cfg.train.total_steps, cfg.run.save_every, cfg.run.log_every, cfg.run.keep_last = 9000, 7, 3, 1
    cfg.run.collective_timeout, cfg.run.project_name, cfg.data.num_workers, cfg.run.debug = 60, "x", 2, True
    cfg.train.grad_clip, cfg.meta.meta_interval, cfg.run.eval_every, cfg.data.eval_file = 0.5, 2, 5, "e.jsonl"
    check_resume_config(cfg, Config().to_dict())


def _fake_checkpoint(root, step, parent, when):
    import os

    from dreamprm import checkpoint as ck
    d = root / ck.tag(step)
    d.mkdir(parents=True)
    (d / "a.pt").write_bytes(b"x" * step)
    ck.write_manifest(d, step, 1, 0, ck.tag(parent) if parent else None, ck.describe_files(d, ["a.pt"]))
    os.utime(d / ck.MANIFEST, (when, when))


def test_auto_resume_passes_over_a_garbled_or_stale_pointer_with_a_note(tmp_path):
    from dreamprm import checkpoint as ck
    from dreamprm.resume import resolve_resume
    for i, (step, parent) in enumerate(((3, None), (6, 3), (9, 6))):
        _fake_checkpoint(tmp_path, step, parent, 1_000_000 + i)
    cfg = Config()
    (tmp_path / ck.LATEST).write_text("")
    path, notes = resolve_resume(cfg, tmp_path)
    assert path == tmp_path / ck.tag(9) and "is empty: resuming from step_00000009" in notes[0]
    ck.write_latest(tmp_path, ck.tag(6))  # edited back: step_9 descends from it and is newer
    path, notes = resolve_resume(cfg, tmp_path)
    assert path == tmp_path / ck.tag(9) and "step_00000009 continues from it" in notes[0]
    cfg.run.resume_from = "none"  # a pointer alone is enough to refuse starting afresh
    for d in tmp_path.glob("step_*"):
        ck.remove_tree(d)
    with pytest.raises(CheckpointError, match="holds checkpoints"):
        resolve_resume(cfg, tmp_path)
    cfg.run.resume_from = "auto"
    with pytest.raises(CheckpointError, match="(?s)no intact checkpoint .*holds no complete checkpoint"):
        resolve_resume(cfg, tmp_path)


def test_transferred_weights_that_changed_since_the_run_started_are_refused(tmp_path):
    import torch

    from dreamprm.resume import check_transferred
    from dreamprm.state import TrainState
    from dreamprm.weights import FixedWeights

    state = TrainState.new(FixedWeights([1.0, 0.5, 2.0]), None, None, None, [0, 0, 0], 1)
    check_transferred(state, {"weights": {"w": torch.tensor([1.0, 0.5, 2.0])}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"--weights_from now gives other weights than the run trained with "
                                              r"\(1 of 3 training examples differ\)"):
        check_transferred(state, {"weights": {"w": torch.tensor([1.0, 0.5, 2.5])}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"\(all of 3"):
        check_transferred(state, {"weights": {"w": torch.ones(4)}}, tmp_path)
    cfg = Config()
    cfg.meta.weights_from = "runs/proxy"
    with pytest.raises(CheckpointError, match="--weights_from: checkpoint has '', this run 'runs/proxy'"):
        check_resume_config(cfg, Config().to_dict())


def test_the_base_check_applies_to_checkpoints_that_record_a_base():
    from dreamprm.resume import check_base

    fp = {"path": "/models/base", "files": {"model.safetensors": {"bytes": 10, "sha256": "a"}}}
    other = {"path": "/models/base", "files": {"model.safetensors": {"bytes": 10, "sha256": "b"}}}
    check_base(None, fp, "CKPT")  # a checkpoint holding the whole model records none
    check_base(fp, {**fp, "path": "/copy/base"}, "CKPT")  # the same files elsewhere
    with pytest.raises(CheckpointError, match="cannot resume from CKPT: .* /models/base, whose files are not the "
                       "ones the run started from: model.safetensors has the same size but another SHA-256"):
        check_base(fp, other, "CKPT")


def test_epochs_resolve_once_and_a_resume_with_the_same_epochs_keeps_the_checkpoints_total_steps(tmp_path):
    import torch

    from dreamprm import checkpoint as ck
    from dreamprm.resume import resolve_epochs
    cfg = Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.warmup_steps = 1.5, 2, 3, 0
    assert resolve_epochs(cfg, 100, 2, None) == [
        "--epochs 1.5: 100 training examples, 12 per update (batch_size 2 x grad_accum 3 x 2 ranks) -> total_steps 13"]
    torch.save({"config": {"train": {"epochs": 1.5, "total_steps": 7}}}, tmp_path / ck.SHARED_STATE)
    assert resolve_epochs(cfg, 100, 4, tmp_path) == ["--epochs 1.5: total_steps 7, as resolved when the run started"]
    assert cfg.train.total_steps == 7
    cfg.train.epochs, cfg.train.warmup_steps = 0.1, 5  # another --epochs: resolved again
    notes = resolve_epochs(cfg, 100, 1, tmp_path)
    assert cfg.train.total_steps == 2 and notes[1].startswith("warning: --warmup_steps 5 >= total_steps 2")


def _checkpoint_of(root, stage=0, train_stream=None, meta_stream=None, deepspeed=""):
    """A checkpoint folder with what check_stage and check_data read: the manifest's stage, the config, rank 0's
    stream states."""
    import torch

    from dreamprm import checkpoint as ck
    d = root / ck.tag(4)
    d.mkdir(parents=True)
    cfg = Config()
    cfg.train.deepspeed = deepspeed
    torch.save({"config": cfg.to_dict()}, d / ck.SHARED_STATE)
    torch.save({"train_stream": train_stream or {}, "meta_stream": meta_stream or {}}, d / ck.rank_file(0))
    ck.write_manifest(d, 4, 1, stage, None, ck.describe_files(d, ck.list_files(d)))
    return d


@pytest.mark.parametrize("saved,ds,now", [(0, "ds_configs/zero3.json", 3), (0, "ds_configs/zero2.json", 2),
                                          (3, "", 0), (2, "ds_configs/zero3.json", 3)])
def test_another_zero_stage_is_refused_naming_deepspeed_and_both_stages(tmp_path, saved, ds, now):
    from dreamprm.resume import check_stage
    old = {0: "", 2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}[saved]
    path = _checkpoint_of(tmp_path, stage=saved, deepspeed=old)
    cfg = Config()
    cfg.train.deepspeed = ds
    with pytest.raises(CheckpointError, match=rf"--deepspeed {ds or 'none'} gives ZeRO stage {now}, but the "
                       rf"checkpoint was written under stage {saved} \(--deepspeed {old or 'none'}\).* a --deepspeed "
                       rf"JSON of stage {saved}"):
        check_stage(cfg, path, world=1)
    cfg.train.deepspeed = old  # the checkpoint's own stage
    check_stage(cfg, path, world=1)


def test_a_manifest_without_a_stage_is_not_compared(tmp_path):
    import json

    from dreamprm import checkpoint as ck
    from dreamprm.resume import check_stage
    path = _checkpoint_of(tmp_path, stage=0)
    man = json.loads((path / ck.MANIFEST).read_text())
    del man["stage"]
    (path / ck.MANIFEST).write_text(json.dumps(man))
    cfg = Config()
    cfg.train.deepspeed = "ds_configs/zero3.json"
    check_stage(cfg, path, world=1)


def _run_data(train_sizes, n_meta):
    from dreamprm.config import Source
    from dreamprm.data.sources import RunData
    train = [Source("--train_file", f"/d/t{k}.jsonl", f"t{k}", "dreamprm", None) for k in range(len(train_sizes))]
    source_of = [k for k, n in enumerate(train_sizes) for _ in range(n)]
    return RunData(train_ex=[None] * len(source_of), meta_ex=[None] * n_meta, domains=[], train_sources=train,
                   meta_sources=[Source("--meta_file", "/d/m.jsonl", "m", "dreamprm", None)], source_of=source_of,
                   difficulty=None, profiles={}, pos_fraction=0.5)


def test_data_of_another_size_is_refused_naming_the_file_and_both_counts(tmp_path):
    from dreamprm.resume import check_data
    path = _checkpoint_of(tmp_path, train_stream={"epoch": 0, "pos": 4, "n": 240, "world": 1, "seed": 0},
                          meta_stream={"epoch": 0, "pos": 2, "n": 64, "world": 1, "seed": 1})
    check_data(_run_data([240], 64), path)
    with pytest.raises(CheckpointError, match=r"(?s)--train_file /d/t0.jsonl: 240 examples in the checkpoint's run, "
                       r"241 now\n.*resume with the same data, or start a new run in another --output_dir"):
        check_data(_run_data([241], 64), path)
    with pytest.raises(CheckpointError, match=r"--meta_file /d/m.jsonl: 64 examples in the checkpoint's run, 63 now"):
        check_data(_run_data([240], 63), path)


def test_a_mixture_is_compared_per_source_and_a_baseline_has_no_meta_stream(tmp_path):
    from dreamprm.resume import check_data
    path = _checkpoint_of(tmp_path, train_stream={"kind": "mixture", "sizes": [100, 140], "t": 3})
    check_data(_run_data([100, 140], 0), path)
    with pytest.raises(CheckpointError, match=r"--train_file /d/t1.jsonl: 140 examples in the checkpoint's run, "
                       r"139 now") as e:
        check_data(_run_data([100, 139], 0), path)
    assert "t0.jsonl" not in str(e.value)


def test_the_readme_resume_rules_name_every_option_on_the_right_side():
    """README.md's "Resume rules" paragraph: every RESUME_MUST_MATCH and RESUME_FROM_STATE flag before "Everything
    else may change", every other option after it (wandb_mode and disable_wandb as "wandb options")."""
    from pathlib import Path

    from dreamprm.config import _fields
    from dreamprm.resume import RESUME_FROM_STATE, RESUME_MUST_MATCH
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rules = readme[readme.index("Resume rules."):readme.index("Input checks.")]
    fixed, free = rules.split("Everything else may change")
    fixed = fixed.replace("`/`_steps`/`_schedule`", "` `--curriculum_steps` `--curriculum_schedule`")
    kept = {k for _, k in RESUME_MUST_MATCH + RESUME_FROM_STATE}
    assert [k for k in sorted(kept) if f"`--{k}`" not in fixed] == []
    other = [f.name for _, f, _ in _fields() if f.name not in kept | {"output_dir", "wandb_mode", "disable_wandb"}]
    assert [k for k in other if f"`--{k}`" not in free] == []
    assert "wandb options" in free
