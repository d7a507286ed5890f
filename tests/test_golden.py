"""Golden runs: the code at REFERENCE and the code here train bit-identically.

A refactor must not change what a run computes. REFERENCE is the last commit whose behaviour
was changed on purpose; this test checks out its tree (git archive), runs the same commands
with both trees on this machine and compares metrics.jsonl (less its timings) and
instance_weights.jsonl (less the checkpoint its rows name, which REFERENCE does not record)
byte for byte. Both runs are on the same machine, so the comparison
holds whatever the CPU's kernels (AMX or AVX512-BF16 round bf16 differently; both trees see
the same ones). A checkpoint written by the reference tree must also resume here and end where
an uninterrupted run of this tree ends.

A change that alters results on purpose moves REFERENCE to its own commit and says why in the
commit message.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# 9d22ddb: the tiny model's head size 32 (for vLLM's CPU attention: issue 24), on the code before the
# redesign of issue 20 (trainer, engine and config split into their parts; that redesign was also checked
# against c140695, the commit before it, with the tiny model of then).
REFERENCE = "9d22ddb"
TIMINGS = ("tokens_per_s", "mem_mb", "time")
PROVENANCE = ("step", "manifest")  # instance_weights.jsonl: the checkpoint written with (its manifest names paths)

# (name, ranks, extra flags over the built-in demo)
RUNS = [
    ("demo", 1, []),
    ("demo-zero3", 2, ["--deepspeed", "ds_configs/zero3.json"]),
    # the production defaults: LoRA, bf16, exact hypergradient, instance_domain_table
    ("defaults", 1, ["--mode", "lora", "--precision", "bf16", "--weights", "instance_domain_table",
                     "--hypergrad", "exact", "--meta_lr", "0.1", "--total_steps", "24", "--log_every", "4",
                     "--save_every", "12"]),
    # fused hypergradient, packed batches, the instance net, a length curriculum
    ("fused", 1, ["--mode", "lora", "--weights", "instance_net", "--hypergrad", "fused", "--packing",
                  "--curriculum", "length", "--total_steps", "24", "--log_every", "4", "--save_every", "12"]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory):
    try:
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", REFERENCE],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        why = f"no git history with {REFERENCE} here ({e}); the golden comparison needs a full clone"
        if os.environ.get("DREAMPRM_REQUIRE_GOLDEN") == "1":  # .ci/run sets it in a full clone: no silent pass
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("reference")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out


def _train(tree: Path, ranks: int, out: Path, flags: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(tree)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = ([sys.executable] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "--master_port", str(_free_port())])
    cmd = launcher + [str(tree / "launch" / "train.py"), "--output_dir", str(out), "--disable_wandb", *flags]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


def _outputs(run: Path) -> tuple[list[dict], str]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    weights = [json.loads(ln) for ln in (run / "instance_weights.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows], \
        "".join(json.dumps({k: v for k, v in r.items() if k not in PROVENANCE}) + "\n" for r in weights)


def test_the_trees_are_different_code(reference_tree):
    """The reference run really uses the reference tree (PYTHONPATH wins over the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(reference_tree)}
    p = subprocess.run([sys.executable, "-c", "import dreamprm; print(dreamprm.__file__)"], env=env,
                       cwd=reference_tree, capture_output=True, text=True, check=True)
    assert Path(p.stdout.strip()).resolve().is_relative_to(reference_tree.resolve())


@pytest.mark.parametrize("name,ranks,flags", RUNS, ids=[r[0] for r in RUNS])
def test_golden_run_is_unchanged(reference_tree, tmp_path, name, ranks, flags):
    _train(reference_tree, ranks, tmp_path / "ref", flags)
    _train(ROOT, ranks, tmp_path / "new", flags)
    ref_rows, ref_w = _outputs(tmp_path / "ref")
    new_rows, new_w = _outputs(tmp_path / "new")
    assert len(new_rows) == len(ref_rows) and ref_rows
    for a, b in zip(ref_rows, new_rows):
        assert a == b, f"update {a['step']}: " + ", ".join(
            f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    assert new_w == ref_w


def test_reference_checkpoint_resumes_here(reference_tree, tmp_path):
    """A checkpoint written before the redesign resumes with this code and ends where a run of
    this code alone ends (the demo, stopped at update 100 of 200 by --total_steps)."""
    _train(reference_tree, 1, tmp_path / "split", ["--total_steps", "100"])
    shutil.rmtree(tmp_path / "split" / "wandb", ignore_errors=True)
    _train(ROOT, 1, tmp_path / "split", [])
    _train(ROOT, 1, tmp_path / "whole", [])
    split_rows, split_w = _outputs(tmp_path / "split")
    whole_rows, whole_w = _outputs(tmp_path / "whole")
    assert [r["step"] for r in split_rows] == [r["step"] for r in whole_rows]
    assert split_rows == whole_rows
    assert split_w == whole_w
