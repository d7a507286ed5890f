"""The built-in demo shows reweighting: its planted noisy domain ends clearly below the clean one."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_default_command_down_weights_the_noisy_domain(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    # the demo's default command (python launch/train.py), in a fresh run directory
    p = subprocess.run([sys.executable, "launch/train.py", "--output_dir", str(out), "--disable_wandb"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    by_domain = {}
    for ln in (out / "instance_weights.jsonl").open():
        r = json.loads(ln)
        by_domain.setdefault(r["id"].split("-")[0], []).append(r["weight"])
    mean = {d: statistics.fmean(w) for d, w in by_domain.items()}
    assert set(mean) == {"clean", "noisy"} and len(by_domain["noisy"]) == 120
    assert abs(statistics.fmean(by_domain["clean"] + by_domain["noisy"]) - 1) < 1e-5  # mean 1 over training
    # the demo ends at 0.80 / 1.20 (README); uniform weights (1 / 1) or a swapped order fail
    assert mean["noisy"] < 0.9 and mean["clean"] > 1.1, mean
