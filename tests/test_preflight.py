"""dreamprm/preflight.py: what lies outside the config (files, model folder, machine, DeepSpeed JSON,
--resume_step, the lock, the model's length limit), reported with the config's own problems at once."""

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest

from dreamprm import checkpoint, preflight, runguard
from dreamprm.config import Config, ConfigError, parse_config, validate

ROOT = Path(__file__).resolve().parents[1]


def load(argv, **kw):
    """As launch/train.py checks: the config's problems and the pre-flight's in one ConfigError."""
    cfg, problems, notes = parse_config(list(map(str, argv)))
    return cfg, notes + preflight.check(cfg, problems, **kw)


def test_validation_reports_every_problem_at_once_naming_flags():
    with pytest.raises(ConfigError) as e:
        load(["--lr", "-1", "--batch_size", "0", "--model_name", "/no/such/model", "--precision", "fp16",
              "--train_file", "/no/such/file.jsonl", "--lora_dropout", "1.5"])
    msg = str(e.value)
    for flag in ("--lr", "--batch_size", "--model_name", "--precision", "--train_file", "--lora_dropout"):
        assert flag in msg
    assert len(e.value.problems) >= 6


def test_files_and_folders_the_config_names_are_checked_here_not_in_the_config(tmp_path):
    argv = ["--eval_file", tmp_path / "e.jsonl", "--eval_every", "5", "--deepspeed", tmp_path / "ds.json",
            "--train_file", f"{tmp_path / 'a.jsonl'},weight=2", "--meta_file", tmp_path / "m.jsonl",
            "--model_name", tmp_path / "model", "--resume_from", tmp_path / "ckpt"]
    cfg, problems, _ = parse_config(list(map(str, argv)))
    assert problems == []  # the config itself is fine
    assert preflight.path_problems(cfg, 1) == [
        f"--eval_file: {tmp_path / 'e.jsonl'}: no such file", f"--deepspeed: {tmp_path / 'ds.json'}: no such file",
        f"--train_file: {tmp_path / 'a.jsonl'}: no such file", f"--meta_file: {tmp_path / 'm.jsonl'}: no such file",
        f"--model_name / --name_or_path: {tmp_path / 'model'} is not a local folder (dreamprm never downloads: "
        "put a HF checkpoint there, e.g. with `huggingface-cli download`)",
        f"--resume_from: {tmp_path / 'ckpt'} is not a checkpoint folder (or use auto / none)"]


def test_config_and_data_problems_are_reported_together(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"schema": 1, "id": "a", "question": "q", "steps": [], "labels": []}) + "\n")
    with pytest.raises(ConfigError) as e:
        load(["--train_file", bad, "--train_format", "dreamprm", "--baseline", "--lr", "-1"])
    assert any(p.startswith("--lr: must be > 0") for p in e.value.problems)
    assert any(str(bad) in p for p in e.value.problems), e.value.problems
    cfg, notes = load(["--train_file", bad, "--train_format", "dreamprm", "--baseline"])  # alone: left to the run
    assert cfg.data.train_file == str(bad)


def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": 3,
                              "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as e:
        load(["--deepspeed", ds, "--batch_size", "2", "--grad_accum", "2", "--mode", "qlora", "--precision", "bf16"],
             check_machine=False)
    msg = str(e.value)
    assert "train_batch_size=64" in msg and "gradient_accumulation_steps=3" in msg
    assert "optimizer" in msg and "ZeRO-3" in msg
    ds.write_text(json.dumps({"train_batch_size": 16}))  # 2 x 2 x the world
    assert load(["--deepspeed", ds, "--batch_size", "2", "--grad_accum", "2"], world=4)[0].train.deepspeed == str(ds)
    with pytest.raises(ConfigError, match="world=2"):
        load(["--deepspeed", ds, "--batch_size", "2", "--grad_accum", "2"], world=2)


def test_shipped_ds_configs_agree_with_default_batch_settings():
    for ds in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = Config()
        cfg.train.deepspeed = str(ds)
        assert validate(cfg) + preflight.path_problems(cfg, 1) == [], ds


def test_seed_script_resume_step_picks_that_checkpoint(tmp_path):
    out = tmp_path / "run"
    for n in (4, 8):
        (out / "checkpoints" / f"step_{n:08d}").mkdir(parents=True)
    cfg, _ = load(["--output_dir", out, "--resume_step", "4"])
    assert cfg.run.resume_from == str(out / "checkpoints" / "step_00000004") and cfg.run.resume_step == 4
    ckpt8 = str(out / "checkpoints" / "step_00000008")
    cfg, _ = load(["--output_dir", out, "--resume_from", ckpt8, "--resume_step", "8"])
    assert cfg.run.resume_from == ckpt8
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run:\n  output_dir: {out}\n  resume_step: 8\n")  # a field: YAML sets it too
    assert load(["--config", recipe])[0].run.resume_from == ckpt8
    for argv, want in ((["--resume_step", "5"], "has no checkpoint of step 5 (steps there: 4, 8)"),
                       (["--resume_from", ckpt8, "--resume_step", "4"], "is not the checkpoint of step 4"),
                       (["--resume_from", "none", "--resume_step", "4"], "contradicts --resume_from none")):
        with pytest.raises(ConfigError, match=r"--resume_step") as e:
            load(["--output_dir", out, *argv])
        assert want in str(e.value)


def test_the_lock_is_checked_when_asked(tmp_path, monkeypatch):
    run = tmp_path / "run"
    lock, _ = runguard.acquire(run)  # held by this live process
    try:
        assert load(["--output_dir", run])[0].run.output_dir == str(run)  # the trainer takes it itself
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            load(["--output_dir", run], check_lock=True)
    finally:
        runguard.release(lock)
    (run / runguard.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "41", "since": "x"}))
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued: a note, no problem
    _, notes = load(["--output_dir", run], check_lock=True)
    assert any("will be taken over" in n for n in notes)


def test_device_and_qlora_needs_are_checked_up_front(monkeypatch):
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        load(["--mode", "qlora", "--precision", "bf16"])
    assert len(e.value.problems) == 1
    msg = e.value.problems[0]
    assert msg.startswith("--mode qlora needs a CUDA GPU and bitsandbytes (pip install 'dreamprm[qlora]')")
    assert "bitsandbytes is not installed and no CUDA GPU is visible" in msg and "--device cpu" in msg
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU is visible"):
        load(["--device", "cuda"])
    assert load(["--device", "cuda"], check_machine=False)[0].train.device == "cuda"
    with pytest.raises(ConfigError, match="bitsandbytes is not installed. Use --mode lora"):
        load(["--mode", "qlora", "--precision", "bf16", "--device", "cpu"])
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    cfg, _ = load(["--mode", "qlora", "--precision", "bf16", "--device", "cpu"])  # asked for: allowed
    assert cfg.train.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load(["--mode", "qlora", "--precision", "bf16"])[0].model.mode == "qlora"


def test_max_length_is_capped_at_the_model_limit_with_one_note(tmp_path):
    cfg, notes = load(["--max_length", "4096"])  # the demo's tiny model takes 1024 positions
    assert cfg.data.max_length == 1024 and sum("is more than the model takes" in n for n in notes) == 1
    cfg, notes = load(["--max_length", "300"])
    assert cfg.data.max_length == 300 and not any("model takes" in n for n in notes)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 256}))
    cfg, notes = load(["--model_name", model, "--max_length", "4096"])
    assert cfg.data.max_length == 256
    assert notes[-1:] == [f"max_length: --max_length 4096 is more than the model takes (256 positions, "
                          f"{model / 'config.json'}); using 256 for training, evaluation and export"]
    assert preflight.model_length_limit({"n_positions": 77}) == 77 and preflight.model_length_limit({}) is None


def test_a_deepspeed_json_that_contradicts_the_config_names_where_the_value_comes_from(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 0.5, "train_batch_size": 16}))
    cfg, _, _ = parse_config(["--deepspeed", str(ds), "--batch_size", "2", "--grad_accum", "2"])
    batch, clip = preflight.check_ds_json(cfg, ds, world=2)
    assert clip == (f"--deepspeed: {ds} sets gradient_clipping=0.5 but the run config gives 1.0 (--grad_clip); "
                    "remove gradient_clipping from the JSON or set it to \"auto\"")
    assert "sets train_batch_size=16 but the run config gives 8 (batch_size=2 x grad_accum=2 x world=2)" in batch


@pytest.mark.parametrize("text,says", [
    ('{"bf16": true}', '"bf16" is true; it must be an object (e.g. "bf16": {"enabled": "auto"})'),
    ("[1, 2]", "the top level is a list; a DeepSpeed config is a JSON object"),
    ('{"zero_optimization": 3}', '"zero_optimization" is 3; it must be an object (e.g. "zero_optimization": '
                                 '{"stage": 3})'),
    ('{"zero_optimization": {"stage": "3"}}', 'zero_optimization.stage is "3"; it must be 0, 1, 2 or 3'),
    ('{"fp16": "off"}', '"fp16" is "off"; it must be an object')])
def test_a_deepspeed_json_with_values_of_the_wrong_type_is_named(tmp_path, text, says):
    ds = tmp_path / "ds.json"
    ds.write_text(text)
    problems = preflight.check_ds_json(Config(), ds, 1)
    assert len(problems) == 1 and problems[0].startswith(f"--deepspeed: {ds}: {says}"), problems


@pytest.mark.parametrize("kind,says", [
    ("directory", "is a directory, not a data file"), ("fifo", "is a named pipe (FIFO), not a data file"),
    ("symlink loop", "is a symbolic link loop (it leads back to itself)")])
@pytest.mark.parametrize("flag", ["--train_file", "--meta_file", "--eval_file", "--deepspeed"])
def test_a_file_flag_given_a_directory_fifo_or_symlink_loop_says_what_it_is(tmp_path, flag, kind, says):
    """The readers' classifier (stat only: a FIFO is never opened), not "does not exist"."""
    f = tmp_path / "x.json"
    {"directory": f.mkdir, "fifo": lambda: os.mkfifo(f), "symlink loop": lambda: f.symlink_to(f.name)}[kind]()
    demo = str(ROOT / "dreamprm/demo/train.jsonl")
    argv = {"--train_file": ["--train_file", f, "--meta_file", demo], "--meta_file": ["--train_file", demo,
            "--meta_file", f], "--eval_file": ["--eval_file", f], "--deepspeed": ["--deepspeed", f]}[flag]
    cfg, _, _ = parse_config(list(map(str, argv)))
    problems = preflight.path_problems(cfg, 1)
    assert len(problems) == 1 and problems[0].startswith(f"{flag}: {f}: {says}"), problems


@pytest.mark.parametrize("data,says", [
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ": JSON nested too deeply"),
    (b'{"steps_per_print": ' + b"9" * 5000 + b"}", ": an integer has more than 4300 digits"),
    (b'{"zero_optimization": {"stage": 2, "stage": 3}}', ": duplicate key 'stage' in one JSON object"),
    (b'{\n  "zero_optimization": {"stage": 2}\n  "bf16": {}\n}', ": invalid JSON (Expecting ',' delimiter at line 3, "),
    (gzip.compress(b'{"zero_optimization": {"stage": 2}}'), ": is gzip-compressed, not UTF-8 JSON text"),
    (bz2.compress(b'{"zero_optimization": {"stage": 2}}'), ": is bzip2-compressed, not UTF-8 JSON text"),
    (b'{"a": "caf\xe9"}', ":1: not valid UTF-8 (byte 0xe9)"), (b" \n", ": is empty; it must hold one JSON value")],
    ids=["deep", "digits", "duplicate key", "syntax", "gzip", "bz2", "latin-1", "blank"])
def test_a_deepspeed_json_python_cannot_read_gets_one_message_naming_the_file(tmp_path, data, says):
    """The data readers' JSON guard (readers.read_json): no RecursionError or digit-limit ValueError, no duplicate
    key kept silently, a compressed file named as such."""
    ds = tmp_path / "ds.json"
    ds.write_bytes(data)
    problems = preflight.check_ds_json(Config(), ds, 1)
    assert len(problems) == 1 and problems[0].startswith(f"--deepspeed: {ds}{says}"), problems


def test_deepspeed_checks_every_field_of_the_json_before_the_model_is_built(tmp_path):
    """A wrong-typed nested value used to pass pre-flight and end in pydantic's ValidationError at engine build."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big",
                                                    "offload_optimizer": {"device": "tpu"}}}))
    with pytest.raises(ConfigError) as e:
        load(["--deepspeed", ds], check_machine=False)
    (size, device), = [e.value.problems]  # pydantic's own words in between
    assert size.startswith(f"--deepspeed: {ds}: zero_optimization.reduce_bucket_size: Input should be a valid integer")
    assert size.endswith(' (got "big")')
    assert device.startswith(f"--deepspeed: {ds}: zero_optimization.offload_optimizer.device: Input should be ")
    assert "'nvme'" in device and device.endswith(' (got "tpu")')


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    for out in (f, f / "run"):
        cfg, problems, _ = parse_config(["--output_dir", str(out)])
        assert problems == []
        assert preflight.path_problems(cfg, 1) == [f"--output_dir: {f} is a file, not a folder"
                                                   + ("" if out == f else f" (on the way to {out})")
                                                   + "; pass the run directory (it is created if missing)"]


def test_weights_from_must_be_a_run_with_learned_weights(tmp_path):
    argv = ["--train_file", ROOT / "dreamprm/demo/train.jsonl", "--train_format", "minif2f"]
    with pytest.raises(ConfigError, match=r"--weights_from .*nope: not a run directory \(no config.yaml\); pass the "
                                          r"--output_dir of a training run or its instance_weights.jsonl"):
        load(argv + ["--weights_from", tmp_path / "nope"])
    run = tmp_path / "base"
    run.mkdir()
    (run / "config.yaml").write_text("data: {}\nmodel: {}\nmeta: {baseline: true}\n")
    with pytest.raises(ConfigError, match="a baseline run .* learned none"):
        load(argv + ["--weights_from", run])
    (run / "config.yaml").write_text("data: {}\nmodel: {}\nmeta: {baseline: false}\n")
    with pytest.raises(ConfigError, match="instance_weights.jsonl: not written yet"):
        load(argv + ["--weights_from", run])
    (run / "instance_weights.jsonl").write_text('{"id": "a", "index": 0, "domain": null, "weight": -1}\n')
    with pytest.raises(ConfigError, match=r"instance_weights.jsonl:1: weight: -1 is not a finite number >= 0"):
        load(argv + ["--weights_from", run / "instance_weights.jsonl"])


def test_weights_from_refuses_weights_their_run_set_aside(tmp_path):
    """A proxy resumed from step 20 after step 40 was found damaged still has step 40's weights file: refused
    before any rank starts, naming both checkpoints."""
    run = tmp_path / "proxy"
    root = run / "checkpoints"
    for step, parent in ((20, None), (40, checkpoint.tag(20))):
        (root / checkpoint.tag(step)).mkdir(parents=True)
        checkpoint.write_manifest(root / checkpoint.tag(step), step, 1, 0, parent, {})
    (run / "config.yaml").write_text("data: {}\nmodel: {}\nmeta: {baseline: false}\n")
    (run / "status.json").write_text(json.dumps({"state": "running", "last_checkpoint": str(root / "step_00000020")}))
    (run / "instance_weights.jsonl").write_text(json.dumps(
        {"id": "a", "index": 0, "domain": None, "weight": 1.0, "step": 40,
         "manifest": checkpoint.manifest_id(root / checkpoint.tag(40))}) + "\n")
    argv = ["--train_file", ROOT / "dreamprm/demo/train.jsonl", "--train_format", "minif2f", "--weights_from", run]
    with pytest.raises(ConfigError, match=r"--weights_from .*proxy: .*holds the weights of step_00000040, but the "
                                          r"run's newest intact checkpoint is step_00000020"):
        load(argv)
