"""A real Slurm cluster (slurm/local-cluster.sh: slurmctld + 4 slurmd on this machine) for one session.

The cluster needs root and the Debian packages slurmctld slurmd slurm-client munge (the script
installs them when missing). Where that is impossible the tests skip and say why; with
DREAMPRM_REQUIRE_SLURM=1 (set by .ci/run) they fail instead. The nodes advertise 64 CPUs and 8
fake GPUs each, so the unmodified template passes `sbatch --test-only`; the jobs that train ask
for no GPUs and run one CPU rank per node (gloo).
"""

import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
NODES = 4  # two 2-node jobs at once
# Every job and direct run: CPU ranks, one thread each, no wandb.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _free_port_block(n: int) -> int:
    """A port p with p..p+n free (slurmctld on p, slurmd i on p+i), away from the jobs' MASTER_PORTs."""
    for _ in range(100):
        base = random.randrange(40000, 60000)
        try:
            for p in range(base, base + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block for the local Slurm cluster")


def _unavailable(reason: str):
    if os.environ.get("DREAMPRM_REQUIRE_SLURM") == "1":
        pytest.fail(f"DREAMPRM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


class Cluster:
    """Submit jobs and wait for them; env holds SLURM_CONF."""

    def __init__(self, slurm_conf: str):
        self.env = {**ENV, "SLURM_CONF": slurm_conf}

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=kw.pop("env", self.env), capture_output=True,
                           text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def submit(self, *opts, script="slurm/minif2f.sbatch", **env) -> str:
        """sbatch from the repository root with extra environment variables; returns the job id."""
        p = self.run("sbatch", "--parsable", *opts, script, env={**self.env, **env})
        return p.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict:
        out = self.run("scontrol", "-o", "show", "job", jid).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, jid: str, timeout: float = 300, skip_requeue_delay: bool = False) -> dict:
        """Poll until the job ends; returns its scontrol fields plus 'output' (the job's log).

        skip_requeue_delay: Slurm holds a requeued job for about 2 minutes (BeginTime); make it
        eligible at once so the test need not wait."""
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(jid)
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime" and skip_requeue_delay:
                self.run("scontrol", "update", f"JobId={jid}", "StartTime=now")
            if info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
                path = Path(info["StdOut"])
                info["output"] = path.read_text() if path.is_file() else ""
                return info
            time.sleep(0.5)
        self.run("scancel", jid, check=False)
        raise AssertionError(f"job {jid} did not end in {timeout} s: {self.job(jid)}")


@pytest.fixture(scope="session")
def slurm():
    if os.geteuid() != 0:
        _unavailable("the local Slurm cluster needs root (slurmd runs jobs as their owner)")
    env = {**os.environ, "SL_NODES": str(NODES), "SL_PORT": str(_free_port_block(NODES))}
    proc = subprocess.Popen(["bash", str(CLUSTER), "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "ready SLURM_CONF=..." once every node is idle, or EOF on failure
    if not line.startswith("ready SLURM_CONF="):
        proc.wait(timeout=120)
        err = proc.stderr.read()
        if proc.returncode == 3:
            _unavailable(f"Slurm is not installed and cannot be: {err.strip()[-500:]}")
        _unavailable(f"the local Slurm cluster did not start (exit {proc.returncode}): {err.strip()[-1500:]}")
    try:
        yield Cluster(line.strip().split("=", 1)[1])
    finally:
        proc.terminate()  # the script cancels every job, stops the daemons, removes its /etc/hosts line
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
