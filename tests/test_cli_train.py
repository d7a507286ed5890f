"""`launch/train.py` before training starts: fast help and flag errors (nothing heavy imported),
what the machine lacks said up front, the seed script's --device, a corpus of config faults."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamprm import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
HEAVY = ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "wandb")


def launch(*args):
    """(process, seconds, top-level modules imported) of `python -X importtime launch/train.py ARGS`."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "launch/train.py", *map(str, args)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    mods = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in p.stderr.splitlines()
            if ln.startswith("import time:")}
    return p, seconds, mods


@pytest.mark.parametrize("args,rc,says", [
    (["--help"], 0, "--total_steps"),
    (["--lr", "-1", "--bogus_flag"], 2, "unrecognized arguments: --bogus_flag"),
    (["--lr", "-1", "--train_file", "/no/such.jsonl"], 2, "--lr: must be > 0"),
])
def test_help_and_flag_errors_import_nothing_heavy(args, rc, says):
    p, seconds, mods = launch(*args)
    assert p.returncode == rc and says in p.stdout + p.stderr
    assert "dreamprm" in mods and "yaml" in mods  # the import log was read
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert seconds < 10  # generous: measured ~0.5 s; importing torch+deepspeed alone takes 8+ s here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_qlora_without_gpu_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "q"
    p, seconds, _ = launch("--mode", "qlora", "--output_dir", out)
    assert p.returncode == 2
    err = p.stderr.split("invalid configuration:", 1)[1]
    assert err.lstrip().startswith("--mode qlora needs a CUDA GPU and bitsandbytes (pip install 'dreamprm[qlora]')")
    assert "no CUDA GPU is visible" in err and "--mode lora" in err
    assert not out.exists()


def test_device_cpu_hides_gpus_before_the_stack_loads(monkeypatch):
    import dreamprm.train

    seen = {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(dreamprm.train, "fit", lambda cfg, notes: seen.update(
        device=cfg.train.device, cuda=os.environ["CUDA_VISIBLE_DEVICES"], ds=os.environ["DS_ACCELERATOR"]) or 0)
    assert cli.train(["--device", "cpu"]) == 0
    assert seen == {"device": "cpu", "cuda": "", "ds": "cpu"}
    # pre-flight imports torch and deepspeed to check a --deepspeed JSON: it must see the hidden GPUs too
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(cli.preflight, "check", lambda cfg, problems: seen.update(
        preflight_cuda=os.environ["CUDA_VISIBLE_DEVICES"]) or [])
    assert cli.train(["--device", "cpu"]) == 0 and seen["preflight_cuda"] == ""


def test_readme_demos_use_separate_run_directories():
    """The one-rank quick start and the 2-rank demo after it must not share a run directory
    (a checkpoint resumes only with the world size that wrote it)."""
    import shlex

    from dreamprm.config import load_config

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    section = readme[start:readme.index("\n## ", start + 1)]
    commands = [ln.split("&&")[-1].strip() for ln in section.splitlines() if "launch/train.py" in ln]
    assert len(commands) == 2 and "--num_gpus 2" in commands[1] and "--master_port" in commands[1]
    dirs = []
    for cmd in commands:
        argv = shlex.split(cmd)
        dirs.append(load_config(argv[argv.index("launch/train.py") + 1:])[0].run.output_dir)
    assert dirs[0] != dirs[1], dirs


DEEP, DIGITS = b"[" * 100_000 + b"]" * 100_000, b"9" * 5000
DEMO = ["--train_file", "dreamprm/demo/train.jsonl", "--train_format", "minif2f"]
# name: (what F is: bytes written to it, or a directory / FIFO / symlink loop / nothing; the arguments;
# how the first problem line starts). {F} is the file's path.
CONFIG_FAULTS = {
    "unknown flag": (None, ["--bogus_flag", "1"], "launch/train.py: error: unrecognized arguments: --bogus_flag 1"),
    "flag of the wrong type": (None, ["--batch_size", "two"],
                               "launch/train.py: error: argument --batch_size: invalid int value: 'two'"),
    "NaN lr": (None, ["--lr", "nan"], "--lr: must be a finite number > 0 (got nan)"),
    "negative seed": (None, ["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    "train_file missing": (None, ["--train_file", "{F}", "--baseline"], "--train_file: {F}: no such file"),
    "train_file a directory": ("dir", ["--train_file", "{F}", "--baseline"], "--train_file: {F}: is a directory"),
    "train_file a FIFO": ("fifo", ["--train_file", "{F}", "--baseline"], "--train_file: {F}: is a named pipe (FIFO)"),
    "meta_file a symlink loop": ("loop", [*DEMO, "--meta_file", "{F}"], "--meta_file: {F}: is a symbolic link loop"),
    "eval_file a FIFO": ("fifo", ["--eval_file", "{F}"], "--eval_file: {F}: is a named pipe (FIFO)"),
    "deepspeed a directory": ("dir", ["--deepspeed", "{F}"], "--deepspeed: {F}: is a directory"),
    "YAML not UTF-8": ("run:\n  project_name: caf\xe9\n".encode("latin-1"), ["--config", "{F}"],
                       "{F}: not UTF-8 text (byte 24"),
    "YAML duplicate key": (b"train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", ["--config", "{F}"],
                           "{F}:3: train.lr is given twice (also at line 2)"),
    "YAML wrong type": (b"train:\n  batch_size: two\n", ["--config", "{F}"], "{F}:2: train.batch_size: 'two' is not"),
    "YAML unknown option": (b"train:\n  bogus: 1\n", ["--config", "{F}"], "{F}:2: unknown option train.bogus"),
    "YAML integer past the digit limit": (b"train:\n  batch_size: " + DIGITS, ["--config", "{F}"],
                                          "{F}:2: an integer has more than 4300 digits"),
    "YAML nested too deeply": (b"train:\n  lr_schedule: " + DEEP[:6000], ["--config", "{F}"],
                               "{F}: cannot read YAML: nested too deeply"),
    "DS JSON nested too deeply": (b'{"x": ' + DEEP + b"}", ["--deepspeed", "{F}"],
                                  "--deepspeed: {F}: JSON nested too deeply"),
    "DS JSON integer past the digit limit": (b'{"steps_per_print": ' + DIGITS + b"}", ["--deepspeed", "{F}"],
                                             "--deepspeed: {F}: an integer has more than 4300 digits"),
    "DS JSON nested value of the wrong type": (b'{"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}',
                                               ["--deepspeed", "{F}"],
                                               "--deepspeed: {F}: zero_optimization.reduce_bucket_size: "),
    "DS JSON a list": (b"[1]", ["--deepspeed", "{F}"], "--deepspeed: {F}: the top level is a list"),
    "DS JSON syntax": (b'{\n "bf16": {}\n "fp16": {}\n}', ["--deepspeed", "{F}"],
                       "--deepspeed: {F}: invalid JSON (Expecting ',' delimiter at line 3"),
    "DS JSON UTF-16": ('{"bf16": {}}'.encode("utf-16"), ["--deepspeed", "{F}"],
                       "--deepspeed: {F}: is UTF-16 text (byte-order mark)"),
    "DS JSON duplicate key": (b'{"zero_optimization": {"stage": 2, "stage": 3}}', ["--deepspeed", "{F}"],
                              "--deepspeed: {F}: duplicate key 'stage'"),
    "DS JSON contradicting the run config": (b'{"train_batch_size": 64}', ["--deepspeed", "{F}"],
                                             "--deepspeed: {F} sets train_batch_size=64 but the run config gives"),
}


@pytest.mark.parametrize("name", list(CONFIG_FAULTS))
def test_a_config_fault_gets_one_message_naming_the_file_or_flag_and_no_traceback(tmp_path, name):
    """Through the documented entry point, as a user meets it: exit 1 or 2, the first problem names FILE[:LINE] or
    the flag, no traceback. --dry_run and a run directory of its own: a fault that got through would build the
    model and exit 0 (failing here), never train."""
    what, argv, says = CONFIG_FAULTS[name]
    f = tmp_path / "f"
    if isinstance(what, bytes):
        f.write_bytes(what)
    elif what is not None:
        {"dir": f.mkdir, "fifo": lambda: os.mkfifo(f), "loop": lambda: f.symlink_to(f.name)}[what]()
    args = [a.replace("{F}", str(f)) for a in argv] + ["--output_dir", str(tmp_path / "run"), "--dry_run",
                                                       "--disable_wandb"]
    p = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    lines = p.stderr.splitlines()
    first = lines[1].strip() if lines[:1] == ["error: invalid configuration:"] else (lines or [""])[0]
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert first.startswith(says.replace("{F}", str(f))), p.stderr[-3000:]
