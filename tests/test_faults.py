"""The fault matrix of the README's reliability section, one test per fault, on real runs.

1 a flipped byte in a checkpoint file (same size)       -> refused naming the file; auto-resume
                                                           falls back to the newest intact one
2 a rollback with a lower --keep_last                   -> the new and the resumed-from checkpoints
                                                           stay; `latest` names a folder that exists
3 a full disk during a checkpoint / at start             -> one message with the last complete
                                                           checkpoint; status failed; no partial
                                                           folder, temp file or empty LOCK left
4 a silent rank; kill -9 of a rank                     -> the collective timeout (or the closed
                                                           connection) ends the job, naming the
                                                           silent rank; status.json says failed
5 a held LOCK                                           -> found by slurm/preflight.py before any
                                                           model is built; a requeued job takes over
6 `latest` empty or edited back; a changed model,       -> resumes from the newest checkpoint of the
  ZeRO stage or data size on resume                        lineage, with a note; the changes are refused
                                                           before the model is built, naming the flag
7 SIGTERM under torchrun (slurm/minif2f.sbatch)         -> the ranks checkpoint; the job exits 143
Rank-count changes on resume are in tests/test_train.py (ZeRO-3, 2 -> 1 and 1 -> 2).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamprm import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
FAST = ["--mode", "lora", "--batch_size", "2", "--meta_batch_size", "2", "--log_every", "1", "--disable_wandb"]


def train(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "launch/train.py", *map(str, args)], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def flip_byte(path: Path) -> bytes:
    """Flip one bit in the middle of a file (its size unchanged); returns the original bytes."""
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(damaged))
    return data


def leftovers(run: Path) -> list[str]:
    """Temp files and partial folders anywhere in a run directory."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp"))


def test_1_a_flipped_byte_in_every_kind_of_checkpoint_file_is_found(tmp_path):
    from dreamprm.errors import ScoringError
    from dreamprm.export import export

    out = tmp_path / "run"
    p = train("--deepspeed", "ds_configs/zero3.json", "--total_steps", 4, "--save_every", 2, "--output_dir", out,
              *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpts = out / "checkpoints"
    step4 = ckpts / ck.tag(4)
    files = ck.list_files(step4)
    # model states, fp32 master weights + both Adam moments, weight table + config, data positions + RNG
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", ck.SHARED_STATE,
            ck.rank_file(0)} <= set(files), files
    for name in files:
        original = flip_byte(step4 / name)
        with pytest.raises(ck.CheckpointError, match=f"{name} \\(checksum differs"):
            ck.verify(step4)
        (step4 / name).write_bytes(original)
    ck.verify(step4)

    flip_byte(step4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ScoringError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt \\(checksum differs"):
        export(out, tmp_path / "exported")
    p = subprocess.run([sys.executable, "slurm/preflight.py", "--nodes", "1", "--ranks_per_node", "1",
                        "--deepspeed", "ds_configs/zero3.json", "--output_dir", out, *FAST],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checksum differs" in p.stdout and f"will resume from {ckpts / ck.tag(2)}" in p.stdout
    p = train("--deepspeed", "ds_configs/zero3.json", "--total_steps", 6, "--save_every", 2, "--output_dir", out,
              "--resume_from", step4, *FAST)
    assert p.returncode == 1 and "zero_pp_rank_0_mp_rank_00_optim_states.pt (checksum differs" in p.stderr
    p = train("--deepspeed", "ds_configs/zero3.json", "--total_steps", 6, "--save_every", 2, "--output_dir", out,
              *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint {step4} is damaged" in p.stdout
    assert f"falling back to {ckpts / ck.tag(2)}" in p.stdout and f"resumed from {ckpts / ck.tag(2)}" in p.stdout
    assert ck.latest(ckpts).name == ck.tag(6)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_2_a_rollback_with_a_lower_keep_last_keeps_the_new_and_the_resumed_checkpoint(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    p = train("--total_steps", 6, "--save_every", 2, "--keep_last", 3, "--output_dir", out, *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    p = train("--total_steps", 3, "--save_every", 2, "--keep_last", 1, "--output_dir", out,
              "--resume_from", ckpts / ck.tag(2), *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(d.name for d in ckpts.glob("step_*")) == [ck.tag(s) for s in (2, 3, 4, 6)]
    assert ck.latest(ckpts).name == ck.tag(3) and ck.verify(ck.latest(ckpts))["parent"] == ck.tag(2)
    p = train("--total_steps", 5, "--save_every", 2, "--keep_last", 1, "--output_dir", out, *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {ckpts / ck.tag(3)}" in p.stdout
    # the lineage 2 -> 3 -> 4' -> 5 thinned to its newest and the resumed-from; 6 is the abandoned history
    assert sorted(d.name for d in ckpts.glob("step_*")) == [ck.tag(s) for s in (3, 5, 6)]
    assert ck.latest(ckpts).name == ck.tag(5)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for one checkpoint of the tiny LoRA run, not two (needs root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_3_a_full_disk_fails_cleanly_and_the_run_resumes_after_space_is_freed(small_disk):
    out = small_disk / "run"
    ckpts = out / "checkpoints"
    args = ["--total_steps", 4, "--save_every", 2, "--keep_last", 2, "--output_dir", out, *FAST]
    p = train(*args)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert (f"disk full while writing checkpoint {ck.tag(4)} in {ckpts}" in p.stderr
            and f"the last complete checkpoint is {ck.tag(2)}" in p.stderr), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "disk full" in status["error"]
    assert leftovers(out) == [] and not (out / "LOCK").exists()
    assert sorted(d.name for d in ckpts.iterdir()) == ["latest", ck.tag(2)]
    # the disk quite full: the lock cannot be written, and says why; no empty LOCK is left behind
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    p = train(*args)
    assert p.returncode == 1 and f"cannot write the lock {out / 'LOCK'}: disk full" in p.stderr, p.stderr[-2000:]
    assert not (out / "LOCK").exists() and leftovers(out) == []
    # space freed (the filler gone, the disk grown): resumes from the last complete checkpoint, finishes
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    p = train(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {ckpts / ck.tag(2)}" in p.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert ck.latest(ckpts).name == ck.tag(4) and leftovers(out) == []


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes torchrun started."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            out[int(env["RANK"])] = int(child)
    return out


def start_two_ranks(out: Path, *flags) -> subprocess.Popen:
    """A 2-rank run of 400 updates (checkpoint every 2), returned once status.json shows update 3."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/train.py",
           "--total_steps", "400", "--save_every", "2", *flags, "--output_dir", str(out), *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        st = out / "status.json"
        if st.is_file() and (json.loads(st.read_text()).get("step") or 0) >= 3:  # None while starting
            break
        time.sleep(0.2)
    return proc


def kill_all(workers: dict, proc: subprocess.Popen) -> None:
    """SIGKILL the rank processes and the launcher (whatever is left of them), then reap the launcher."""
    for pid in [*workers.values(), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def test_4_a_silent_rank_ends_the_job_at_the_collective_timeout_naming_it(tmp_path):
    out = tmp_path / "run"
    proc = start_two_ranks(out, "--collective_timeout", "10")
    workers = {}
    try:
        workers = worker_pids(proc.pid)
        silent = workers[1]
        os.kill(silent, signal.SIGSTOP)  # a hung rank: alive, but answers nothing (as a lost node)
        t0 = time.time()
        while time.time() - t0 < 240 and json.loads((out / "status.json").read_text())["state"] == "running":
            time.sleep(0.5)
        waited = time.time() - t0
        os.kill(silent, signal.SIGKILL)
        _stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_all(workers, proc)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "rank 1 went silent" in status["error"], (status, stderr[-3000:])
    assert "--collective_timeout 10 s" in status["error"] and "to resume from" in status["error"]
    assert "rank 1 went silent" in stderr and proc.returncode != 0
    assert waited < 120  # 10 s of collective timeout and 10 s of monitored barrier, not torch's 30 minutes
    assert ck.latest(out / "checkpoints") is not None and not (out / "LOCK").exists()


def test_4_kill_9_of_a_rank_ends_the_job_and_status_says_failed(tmp_path):
    out = tmp_path / "run"
    proc = start_two_ranks(out)
    workers = {}
    try:
        workers = worker_pids(proc.pid)
        t0 = time.time()
        os.kill(workers[1], signal.SIGKILL)
        _stdout, stderr = proc.communicate(timeout=300)
        took = time.time() - t0
    finally:
        kill_all(workers, proc)
    assert proc.returncode != 0 and took < 120
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "a rank died or a node was lost" in status["error"], status
    p = train("--total_steps", status["step"] + 1, "--save_every", 2, "--output_dir", out, *FAST)
    assert p.returncode == 0 and f"resumed from {status['last_checkpoint']}" in p.stdout, p.stderr[-2000:]


def test_5_a_held_lock_is_found_before_the_model_is_built(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "LOCK").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                              "slurm_job_id": "7", "since": "earlier"}))
        t0 = time.time()
        preflight = [sys.executable, "slurm/preflight.py", "--nodes", "1", "--ranks_per_node", "1",
                     "--output_dir", out, *FAST]
        p = subprocess.run(preflight, cwd=ROOT, env={**ENV, "SLURM_JOB_ID": "8"}, capture_output=True, text=True,
                           timeout=300)
        # exit 2: the lock is one of dreamprm.preflight's problems (slurm/preflight.py's docstring)
        assert p.returncode == 2 and f"in use by pid {holder.pid}" in p.stderr and "Slurm job 7" in p.stderr
        p = train("--total_steps", 1, "--output_dir", out, *FAST, env={**ENV, "SLURM_JOB_ID": "8"})
        assert p.returncode == 1 and f"in use by pid {holder.pid}" in p.stderr
        assert "ranks 1, ZeRO stage" not in p.stdout  # refused before the model was built
        # the same job requeued (rank 0 now on another host): taken over with a note
        (out / "LOCK").write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job_id": "7",
                                              "since": "earlier"}))
        p = subprocess.run(preflight, cwd=ROOT, env={**ENV, "SLURM_JOB_ID": "7"}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0 and "will be taken over" in p.stdout, p.stderr[-2000:]
        p = train("--total_steps", 1, "--output_dir", out, *FAST, env={**ENV, "SLURM_JOB_ID": "7"})
        assert p.returncode == 0 and "replaced a stale lock" in p.stdout, p.stderr[-2000:]
        assert not (out / "LOCK").exists()
        assert time.time() - t0 < 600
    finally:
        holder.kill()
        holder.wait()


SHIMS = {  # just enough Slurm for slurm/minif2f.sbatch on one machine: srun runs the step, scancel signals it
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\necho $$ >> "$SHIM_DIR/steps"\nexec "$@"\n',
    "scancel": '#!/bin/bash\nfor p in $(cat "$SHIM_DIR/steps"); do kill -TERM "$p" 2>/dev/null; done\n',
    "scontrol": '#!/bin/bash\necho localhost\n'}


def test_7_sigterm_of_a_job_under_torchrun_exits_143_as_a_single_process_does(tmp_path):
    import socket
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {**ENV, "PATH": f"{shims}:{ENV['PATH']}", "SHIM_DIR": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "t", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "GPUS_PER_NODE": "1", "CONFIG": "dreamprm/demo/demo.yaml", "DS_CONFIG": "", "OUTPUT_DIR": str(out),
           "PYTHON": sys.executable, "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
           "EXTRA_ARGS": "--total_steps 400 --save_every 2 " + " ".join(FAST)}
    job = subprocess.Popen(["bash", "slurm/minif2f.sbatch"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None:
            st = out / "status.json"
            if st.is_file() and (json.loads(st.read_text()).get("step") or 0) >= 3:
                break
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)  # preemption / scancel: Slurm signals the batch script
        log, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped", (status, log[-3000:])
    assert job.returncode == 143, log[-3000:]
    assert "training exited with status" in log and ck.latest(out / "checkpoints") is not None


def test_6_a_damaged_or_stale_latest_resumes_from_the_newest_checkpoint_and_a_changed_model_is_refused(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    data = tmp_path / "train.jsonl"  # the demo's, in a file this test may edit
    data.write_text((ROOT / "dreamprm/demo/train.jsonl").read_text())
    run = ["--config", "dreamprm/demo/demo.yaml", "--output_dir", out, "--train_file", data, "--train_format",
           "minif2f", "--meta_file", ROOT / "dreamprm/demo/meta.jsonl", "--meta_format", "minif2f", *FAST]
    p = train("--total_steps", 3, "--save_every", 1, "--keep_last", 5, *run)
    assert p.returncode == 0, p.stderr[-3000:]
    (ckpts / ck.LATEST).write_text("")  # empty (a crash of an older writer, a full disk, a hand edit)
    p = train("--total_steps", 4, "--save_every", 1, "--keep_last", 5, *run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{ckpts / ck.LATEST} is empty: resuming from {ck.tag(3)}" in p.stdout
    assert f"resumed from {ckpts / ck.tag(3)}" in p.stdout
    ck.write_latest(ckpts, ck.tag(2))  # edited back: step_4 continues from step_2 and is newer
    p = train("--total_steps", 5, "--save_every", 1, "--keep_last", 5, *run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"names {ck.tag(2)}, but {ck.tag(4)} continues from it" in p.stdout
    assert f"resumed from {ckpts / ck.tag(4)}" in p.stdout and ck.latest(ckpts).name == ck.tag(5)
    # a changed model definition, another ZeRO stage, data of another size: refused before the model is built,
    # naming the flag; status says failed
    grown = data.read_text() + data.read_text().splitlines()[0].replace('"clean-', '"added-') + "\n"
    for flags, says in ((["--mode", "lora", "--lora_alpha", "64"], "--lora_alpha: checkpoint has 32, this run 64"),
                        (["--precision", "bf16"], "--precision: checkpoint has 'fp32', this run 'bf16'"),
                        (["--lora_targets", "q_proj"], "--lora_targets: checkpoint has"),
                        (["--lr", "0.01"], "--lr: checkpoint has 0.001, this run 0.01 (a resumed run takes it"),
                        (["--deepspeed", "ds_configs/zero3.json"], "--deepspeed ds_configs/zero3.json gives ZeRO "
                         "stage 3, but the checkpoint was written under stage 0 (--deepspeed none)"),
                        ([], f"--train_file {data}: 240 examples in the checkpoint's run, 241 now")):
        if not flags:  # one record appended to the training file
            data.write_text(grown)
        p = train("--total_steps", 6, *run, *flags)
        assert p.returncode == 1 and says in p.stderr and "Traceback" not in p.stderr, (flags, p.stderr[-3000:])
        assert "ranks 1, ZeRO stage" not in p.stdout  # before the model was built
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "failed" and says in status["error"]
        if flags[:1] in (["--deepspeed"], []):  # the two a requeued Slurm job would otherwise meet on every rank
            p = subprocess.run([sys.executable, "slurm/preflight.py", "--nodes", "1", "--ranks_per_node", "1",
                                *map(str, run), "--total_steps", "6", *flags],
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
            assert p.returncode == 1 and "preflight: error: " in p.stderr and says in p.stderr, p.stderr[-3000:]
    assert ck.latest(ckpts).name == ck.tag(5)
