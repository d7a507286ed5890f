"""slurm/minif2f.sbatch against a real Slurm (tests/slurm/conftest.py): the tiny demo on 2 emulated
nodes x 1 CPU rank under ZeRO-3, compared with the same run launched directly with torchrun; a job
signalled before its time limit checkpoints, requeues and resumes to the same final state; bad input
fails before any rank starts; two jobs cannot share a run directory."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamprm import checkpoint, engine

pytestmark = pytest.mark.slurm
NODES = 4  # in the cluster (conftest.py)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16
DEMO = {"CONFIG": "dreamprm/demo/demo.yaml", "DS_CONFIG": "ds_configs/zero3.json"}
TRAIN_ARGS = ["--total_steps", str(STEPS), "--log_every", "1", "--save_every", "5", "--keep_last", "2",
              "--disable_wandb"]
CPU = "--gpus-per-node=0"  # the nodes' GPUs are fake: train on one CPU rank per node
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def assert_same_final_state(a: Path, b: Path) -> None:
    """Final checkpoint (consolidated fp32 parameters), instance weights and logged losses agree."""
    ca, cb = checkpoint.latest(a / "checkpoints"), checkpoint.latest(b / "checkpoints")
    assert ca.name == cb.name == f"step_{STEPS:08d}"
    sa, sb = engine.consolidated_state_dict(ca), engine.consolidated_state_dict(cb)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6), k
    wa, wb = read_jsonl(a / "instance_weights.jsonl"), read_jsonl(b / "instance_weights.jsonl")
    assert [w["id"] for w in wa] == [w["id"] for w in wb] and len(wa) == 240
    assert all(abs(x["weight"] - y["weight"]) <= 1e-6 for x, y in zip(wa, wb))
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        for key in ("loss", "loss_unweighted", "meta_loss"):
            assert abs(x[key] - y[key]) <= 1e-6, (x["step"], key, x[key], y[key])


def wait_for_step(run: Path, step: int, slurm, jid: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run / "status.json"
        if status.is_file() and (json.loads(status.read_text())["step"] or 0) >= step:  # null while starting
            return
        state = slurm.job(jid)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), slurm.job(jid)
        time.sleep(0.2)
    raise AssertionError(f"{run} did not reach update {step} in {timeout} s")


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The demo three ways, at once (2 cores are enough; it saves minutes): launched directly with
    torchrun (2 ranks, one machine); through the template on 2 nodes; and through the template on 2
    nodes with SIGUSR1 sent to the batch script at update 2, as --signal=B:USR1@180 does before the
    time limit."""
    tmp = tmp_path_factory.mktemp("runs")
    dirs = {name: tmp / name for name in ("direct", "slurm", "signalled")}
    jobs = {name: slurm.submit(CPU, f"--output={tmp}/{name}-%j.out", **DEMO, OUTPUT_DIR=str(dirs[name]),
                               EXTRA_ARGS=" ".join(TRAIN_ARGS)) for name in ("slurm", "signalled")}
    direct = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                               "--nproc-per-node=2", "launch/train.py", "--config", DEMO["CONFIG"], "--deepspeed",
                               DEMO["DS_CONFIG"], "--output_dir", str(dirs["direct"]), *TRAIN_ARGS],
                              cwd=ROOT, env=slurm.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(dirs["signalled"], 2, slurm, jobs["signalled"])
        slurm.run("scancel", "--signal=USR1", "--batch", jobs["signalled"])
        out, _ = direct.communicate(timeout=600)
    finally:
        direct.kill()
    assert direct.returncode == 0, out[-5000:]
    return {"dirs": dirs, "jobs": {name: slurm.wait(jid, skip_requeue_delay=True) for name, jid in jobs.items()},
            "ids": jobs}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_parses_and_fits_the_cluster(slurm, template):
    assert subprocess.run(["bash", "-n", str(template)], capture_output=True).returncode == 0
    text = template.read_text()
    assert f"sbatch slurm/{template.name}" in text  # the submit command is in the header
    p = slurm.run("sbatch", "--test-only", template, check=False)
    assert p.returncode == 0 and "to start at" in p.stderr, p.stderr
    # resources can be changed without editing: more nodes than the cluster has is refused
    p = slurm.run("sbatch", "--test-only", f"--nodes={NODES + 1}", template, check=False)
    assert p.returncode != 0 and "node configuration is not available" in p.stderr, p.stderr


def test_demo_on_two_nodes_matches_the_direct_torchrun_run(runs):
    job, run = runs["jobs"]["slurm"], runs["dirs"]["slurm"]
    out = job["output"]
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", out[-5000:]
    assert re.search(r"job \d+ \(restart 0\) on node\[\d-\d\]: 2 node\(s\) x 1 rank\(s\)", out), out[:2000]
    assert "preflight: ok for 2 ranks" in out and "ranks 2, ZeRO stage 3" in out
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (run / "LOCK").exists()
    assert_same_final_state(run, runs["dirs"]["direct"])


def test_time_limit_signal_checkpoints_requeues_and_resumes(runs):
    job, run, jid = runs["jobs"]["signalled"], runs["dirs"]["signalled"], runs["ids"]["signalled"]
    out = job["output"]
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", out[-5000:]
    assert "SIGUSR1: telling every rank to checkpoint and stop" in out
    stopped = re.findall(r"^stopped by signal at update (\d+);", out, re.M)
    assert len(stopped) == 1, out[-5000:]
    step = int(stopped[0])
    assert 2 <= step < STEPS, "the job finished before the signal arrived; raise STEPS"
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert f"requeuing job {jid}" in out and "(restart 1)" in out
    assert f"preflight: will resume from {ckpt} (update {step})" in out
    assert f"resumed from {ckpt} at update {step}" in out
    assert_same_final_state(run, runs["dirs"]["direct"])


def test_a_second_job_on_the_same_run_directory_is_refused(slurm, tmp_path):
    """Job 1 holds the run directory's lock as a running trainer does; job 2 (the template) is refused."""
    run = tmp_path / "run"
    holder = tmp_path / "hold.sbatch"
    holder.write_text("#!/bin/bash\nexec \"$PYTHON\" -c 'import sys, time, pathlib; from dreamprm import runguard; "
                      "runguard.acquire(pathlib.Path(sys.argv[1])); time.sleep(600)' \"$RUN\"\n")
    first = slurm.submit("--nodes=1", CPU, f"--output={tmp_path}/%x-%j.out", script=holder, RUN=str(run))
    deadline = time.time() + 60
    while not (run / "LOCK").is_file():
        assert time.time() < deadline and slurm.job(first)["JobState"] in ("PENDING", "RUNNING"), slurm.job(first)
        time.sleep(0.2)
    second = slurm.wait(slurm.submit("--nodes=1", CPU, f"--output={tmp_path}/%x-%j.out", **DEMO,
                                     OUTPUT_DIR=str(run), EXTRA_ARGS="--disable_wandb"))
    slurm.run("scancel", first)
    out = second["output"]
    assert second["JobState"] == "FAILED", out[-5000:]
    assert f"run directory {run} is in use by pid" in out and f"(Slurm job {first})" in out, out[-5000:]
    assert "Two jobs must not write one run directory" in out
    assert not (run / "checkpoints").exists()


def _bad_data(tmp: Path) -> dict:
    """3 training and 3 meta records: too few for 2 nodes x 2 ranks."""
    rec = {"schema": 1, "question": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "The answer is 5."],
           "labels": [1.0, 1.0], "outcome": 1.0, "domain": "arith"}
    for name in ("train", "meta"):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({**rec, "id": f"{name}{i}"}) + "\n" for i in range(3)))
    return {"EXTRA_ARGS": f"--train_file {tmp}/train.jsonl --train_format dreamprm "
                          f"--meta_file {tmp}/meta.jsonl --meta_format dreamprm --disable_wandb"}


BAD = {  # name: (sbatch options, environment, what the job output must say)
    "missing CONFIG": (["--nodes=1"], lambda tmp: {"CONFIG": "recipes/nope.yaml"},
                       ["error: CONFIG=recipes/nope.yaml does not exist", "CONFIG=recipes/minif2f.yaml sbatch"]),
    "wrong CONFIG": (["--nodes=1"], lambda tmp: {"CONFIG": str(tmp / "bad.yaml")},
                     ["bad.yaml:4: unknown option train.lrate",
                      "--model_name / --name_or_path: models/none is not a local folder"]),
    "PYTHON without dreamprm": (["--nodes=1"], lambda tmp: {"PYTHON": f"{sys.executable} -S"},  # -S: no site-packages
                                ["cannot import dreamprm", "activate its environment", "or set PYTHON"]),
    "recipe's data": (["--nodes=2", "--gpus-per-node=2"], _bad_data,
                      ["3 training example(s) for 4 ranks (2 node(s) x 2 per node); every rank needs at least one",
                       "Submit with at most --nodes=1", "--meta_file"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_any_rank_starts(slurm, tmp_path, case):
    (tmp_path / "bad.yaml").write_text("model:\n  name_or_path: models/none\ntrain:\n  lrate: 0.1\n")
    opts, env, expected = BAD[case]
    env = {**DEMO, "OUTPUT_DIR": str(tmp_path / "run"), **env(tmp_path)}
    if not any(o.startswith("--gpus") for o in opts):
        opts = [CPU, *opts]
    job = slurm.wait(slurm.submit(*opts, f"--output={tmp_path}/%x-%j.out", **env))
    out = job["output"]
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", out[-5000:]
    for text in expected:
        assert text in out, (text, out[-5000:])
    assert "nothing was started; fix it and resubmit" in out and "ZeRO stage" not in out
    assert not (tmp_path / "run").exists()


def test_resuming_on_another_node_count_continues(slurm, runs, tmp_path):
    """The 2-node run's checkpoints (a copy), resubmitted on 1 node: converted, resumed, finished."""
    run = tmp_path / "run"
    shutil.copytree(runs["dirs"]["slurm"], run)
    args = [*TRAIN_ARGS[:1], str(STEPS + 2), *TRAIN_ARGS[2:]]
    job = slurm.wait(slurm.submit(CPU, "--nodes=1", f"--output={tmp_path}/%x-%j.out", **DEMO, OUTPUT_DIR=str(run),
                                  EXTRA_ARGS=" ".join(args)))
    out = job["output"]
    assert job["JobState"] == "COMPLETED", out[-5000:]
    assert f"step_{STEPS:08d} was written by 2 ranks and this job has 1 ranks (1 node(s) x 1 per node)" in out
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS:08d}'}" in out
    assert checkpoint.latest(run / "checkpoints").name == f"step_{STEPS + 2:08d}"
