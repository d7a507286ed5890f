import json
from pathlib import Path

import pytest

from dreamprm.config import (
    Config,
    ConfigError,
    apply_yaml,
    build_parser,
    load_config,
    markdown_reference,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def test_no_config_runs_the_demo_recipe():
    cfg, notes = load_config([])
    assert "demo" in notes[0]
    assert cfg.model.name_or_path == "" and cfg.data.train_file == ""


def test_seed_script_flags_are_aliases_with_the_same_meaning(tmp_path):
    train, meta = tmp_path / "t.jsonl", tmp_path / "m.jsonl"
    train.write_text("{}\n")
    meta.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    cfg, _ = load_config([
        "--train_json_file", str(train), "--meta_json_file", str(meta), "--model_name", str(model),
        "--weights_path", str(tmp_path / "out"), "--total_steps", "7", "--batch_size", "2",
        "--meta_batch_size", "3", "--lr", "1e-4", "--meta_lr", "0.5", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.1", "--max_length", "128", "--precision", "fp32", "--seed", "3",
        "--num_workers", "0", "--project_name", "p", "--experiment_name", "e", "--disable_wandb",
        "--resume_from", "none", "--dry_run", "--debug", "--baseline"])
    assert (cfg.data.train_file, cfg.data.meta_file, cfg.model.name_or_path) == (str(train), str(meta), str(model))
    assert cfg.run.output_dir == str(tmp_path / "out")
    assert (cfg.train.total_steps, cfg.train.batch_size, cfg.meta.meta_batch_size) == (7, 2, 3)
    assert (cfg.train.lr, cfg.meta.meta_lr, cfg.model.lora_r, cfg.model.lora_alpha) == (1e-4, 0.5, 4, 8)
    assert cfg.run.disable_wandb and cfg.run.dry_run and cfg.run.debug and cfg.meta.baseline


def test_sources_repeat_as_flags_and_list_in_yaml(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}\n")
    b.write_text("{}\n")
    cfg, _ = load_config(["--train_file", str(a), "--baseline"])
    assert cfg.data.train_file == str(a)  # one source: a plain string, as before
    cfg, _ = load_config(["--train_file", f"{a},domain=x", "--train_file", f"{b},weight=2", "--baseline"])
    assert cfg.data.train_file == [f"{a},domain=x", f"{b},weight=2"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train_file:\n    - {a}\n    - path: {b}\n      weight: 3\n  meta_file: [{a}]\n")
    cfg, _ = load_config(["--config", str(recipe)])
    assert cfg.data.train_file == [str(a), {"path": str(b), "weight": 3}] and cfg.data.meta_file == str(a)
    recipe.write_text("data:\n  train_file: [1, 2]\n")
    with pytest.raises(ConfigError, match="train_file"):
        load_config(["--config", str(recipe)])


def test_new_options_are_validated_naming_the_flag():
    cfg = Config()
    cfg.data.mix, cfg.data.num_workers, cfg.data.mix_alpha = "learned", 2, float("nan")
    cfg.data.curriculum_start, cfg.data.prompt_template = 0.0, "no question here"
    cfg.train.pos_fraction, cfg.train.focal_gamma = 1.0, -1.0
    text = "\n".join(validate(cfg))
    for flag in ("--mix learned: samples", "--mix learned: the sampling", "--mix_alpha", "--curriculum_start",
                 "--prompt_template", "--pos_fraction", "--focal_gamma"):
        assert flag in text, flag


def test_help_lists_every_option():
    text = build_parser().format_help()
    for sec in ("data", "model", "train", "meta", "run"):
        for name in getattr(Config(), sec).__dataclass_fields__:
            assert f"--{name}" in text


def test_validation_reports_every_problem_at_once_naming_flags():
    with pytest.raises(ConfigError) as e:
        load_config(["--lr", "-1", "--batch_size", "0", "--model_name", "/no/such/model", "--precision", "fp16",
                     "--train_file", "/no/such/file.jsonl", "--lora_dropout", "1.5"])
    msg = str(e.value)
    for flag in ("--lr", "--batch_size", "--model_name", "--precision", "--train_file", "--lora_dropout"):
        assert flag in msg
    assert len(e.value.problems) >= 6


def test_yaml_errors_name_file_and_line(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("train:\n  lr: 0.1\n  batchsize: 3\nmodle:\n  mode: lora\nmeta:\n  meta_lr: fast\n")
    cfg, problems = Config(), []
    apply_yaml(cfg, y, problems)
    assert any(f"{y}:3" in p and "train.batchsize" in p for p in problems)
    assert any(f"{y}:4" in p and "modle" in p for p in problems)
    assert any(f"{y}:7" in p and "meta.meta_lr" in p for p in problems)
    assert cfg.train.lr == 0.1


def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": 3,
                              "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as e:
        load_config(["--deepspeed", str(ds), "--batch_size", "2", "--grad_accum", "2", "--mode", "qlora",
                     "--precision", "bf16"])
    msg = str(e.value)
    assert "train_batch_size=64" in msg and "gradient_accumulation_steps=3" in msg
    assert "optimizer" in msg and "ZeRO-3" in msg


def test_finite_differences_in_bf16_full_finetune_is_rejected():
    cfg = Config()
    cfg.model.mode, cfg.train.precision, cfg.meta.hypergrad = "full", "bf16", "finite_diff"
    assert any("--hypergrad" in p for p in validate(cfg))
    cfg.meta.hypergrad = "exact"
    assert not any("--hypergrad" in p for p in validate(cfg))


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")) + [ROOT / "dreamprm/demo/demo.yaml"],
                         ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    cfg, problems = Config(), []
    apply_yaml(cfg, recipe, problems)
    assert problems == []
    # only the paths a user must supply (or ../shared/realdata) may be invalid
    left = [p for p in validate(cfg)
            if not p.startswith(("--train_file", "--meta_file", "--eval_file", "--model_name"))]
    assert left == []


def test_shipped_ds_configs_agree_with_default_batch_settings():
    for ds in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = Config()
        cfg.train.deepspeed = str(ds)
        assert validate(cfg) == [], ds


def test_readme_config_reference_matches_the_code():
    assert markdown_reference() in (ROOT / "README.md").read_text()


def test_seed_script_resume_step_picks_that_checkpoint(tmp_path):
    out = tmp_path / "run"
    for n in (4, 8):
        (out / "checkpoints" / f"step_{n:08d}").mkdir(parents=True)
    cfg, _ = load_config(["--output_dir", str(out), "--resume_step", "4"])
    assert cfg.run.resume_from == str(out / "checkpoints" / "step_00000004")
    ckpt8 = str(out / "checkpoints" / "step_00000008")
    cfg, _ = load_config(["--output_dir", str(out), "--resume_from", ckpt8, "--resume_step", "8"])
    assert cfg.run.resume_from == ckpt8
    for argv, want in ((["--resume_step", "5"], "has no checkpoint of step 5 (steps there: 4, 8)"),
                       (["--resume_from", ckpt8, "--resume_step", "4"], "is not the checkpoint of step 4"),
                       (["--resume_from", "none", "--resume_step", "4"], "contradicts --resume_from none")):
        with pytest.raises(ConfigError, match=r"--resume_step"):
            load_config(["--output_dir", str(out), *argv])
        try:
            load_config(["--output_dir", str(out), *argv])
        except ConfigError as e:
            assert want in str(e)


def test_device_and_qlora_needs_are_checked_up_front(monkeypatch):
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(["--mode", "qlora", "--precision", "bf16"])
    assert len(e.value.problems) == 1
    msg = e.value.problems[0]
    assert msg.startswith("--mode qlora needs a CUDA GPU and bitsandbytes (pip install 'dreamprm[qlora]')")
    assert "bitsandbytes is not installed and no CUDA GPU is visible" in msg and "--device cpu" in msg
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU is visible"):
        load_config(["--device", "cuda"])
    with pytest.raises(ConfigError, match="bitsandbytes is not installed. Use --mode lora"):
        load_config(["--mode", "qlora", "--precision", "bf16", "--device", "cpu"])
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    cfg, _ = load_config(["--mode", "qlora", "--precision", "bf16", "--device", "cpu"])  # asked for: allowed
    assert cfg.train.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(["--mode", "qlora", "--precision", "bf16"])[0].model.mode == "qlora"


def test_max_length_is_capped_at_the_model_limit_with_one_note(tmp_path):
    cfg, notes = load_config(["--max_length", "4096"])  # the demo's tiny model takes 1024 positions
    assert cfg.data.max_length == 1024 and sum("is more than the model takes" in n for n in notes) == 1
    cfg, notes = load_config(["--max_length", "300"])
    assert cfg.data.max_length == 300 and not any("model takes" in n for n in notes)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 256}))
    cfg, notes = load_config(["--model_name", str(model), "--max_length", "4096"])
    assert cfg.data.max_length == 256
    assert notes[-1:] == [f"max_length: --max_length 4096 is more than the model takes (256 positions, "
                     f"{model / 'config.json'}); using 256 for training, evaluation and export"]
