"""`launch/train.py` before training starts: fast help and flag errors (nothing heavy imported),
what the machine lacks said up front, the seed script's --device."""

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
