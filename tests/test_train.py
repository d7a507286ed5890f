"""launch/train.py end to end: the demo, bad input, signals, the run lock, resume guards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamprm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
FAST = ["--mode", "lora", "--batch_size", "2", "--meta_batch_size", "2", "--log_every", "1", "--disable_wandb"]


def train(*args, timeout=600):
    return subprocess.run([sys.executable, "launch/train.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_on_two_ranks_zero3_with_the_deepspeed_launcher(tmp_path):
    """The acceptance command: finishes, losses go down, the run directory is complete."""
    out = tmp_path / "demo"
    launcher = str(Path(sys.executable).parent / "deepspeed")
    p = subprocess.run([launcher, "--num_gpus", "2", "launch/train.py", "--deepspeed", "ds_configs/zero3.json",
                        "--output_dir", str(out)], cwd=ROOT, env={**ENV, "WANDB_MODE": "offline"},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    first, last = rows[:3], rows[-3:]
    for key in ("loss", "meta_loss"):
        assert sum(r[key] for r in last) < sum(r[key] for r in first), key
    for key in ("lr", "meta_lr", "w_mean", "w_std", "tokens_per_s", "mem_mb"):
        assert key in rows[-1]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 200
    assert (out / "config.yaml").is_file() and not (out / "LOCK").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000100", "step_00000200"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000200"
    man = json.loads((out / "checkpoints" / "step_00000200" / "MANIFEST.json").read_text())
    assert {"dreamprm_state.pt", "dreamprm_rank00000.pt", "dreamprm_rank00001.pt"} <= set(man["files"])
    weights = [json.loads(ln) for ln in (out / "instance_weights.jsonl").open()]
    assert len(weights) == 240 and len({w["id"] for w in weights}) == 240
    assert list((out / "wandb").glob("offline-run-*"))


def test_meta_file_without_outcomes_fails_before_training(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"schema": 1, "id": "a", "question": "q", "steps": ["s"], "labels": [1.0]}) + "\n")
    p = train("--train_file", ROOT / "dreamprm/demo/train.jsonl", "--train_format", "minif2f",
              "--meta_file", meta, "--output_dir", tmp_path / "run", *FAST)
    assert p.returncode == 1
    assert "no record has an outcome label" in p.stderr and str(meta) in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--total_steps", "400", "--save_every", "1000",
            "--output_dir", str(out), *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        st = out / "status.json"
        if st.is_file() and (json.loads(st.read_text()).get("step") or 0) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped"
    stopped_at = status["step"]
    assert checkpoint.latest(out / "checkpoints").name == f"step_{stopped_at:08d}"
    p = train("--total_steps", stopped_at + 2, "--save_every", 1000, "--output_dir", out, *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in p.stdout
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))


def test_partial_and_corrupt_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    assert train("--total_steps", 2, "--output_dir", out, *FAST).returncode == 0
    ckpt = out / "checkpoints" / "step_00000002"
    man = ckpt / "MANIFEST.json"
    saved = man.read_text()
    man.unlink()  # an interrupted save has no manifest
    p = train("--total_steps", 4, "--output_dir", out, *FAST)
    assert p.returncode == 1 and "names step_00000002, which is incomplete" in p.stderr
    assert "holds no complete checkpoint" in p.stderr  # never a fresh start over a run's checkpoints
    man.write_text(saved)
    with open(ckpt / "dreamprm_state.pt", "ab") as f:  # a damaged file: size no longer matches
        f.write(b"junk")
    p = train("--total_steps", 4, "--output_dir", out, *FAST)
    assert p.returncode == 1 and "damaged" in p.stderr and "dreamprm_state.pt" in p.stderr
    # and a run that wants to start fresh is told the directory already has checkpoints
    p = train("--total_steps", 4, "--output_dir", out, "--resume_from", "none", *FAST)
    assert p.returncode == 1 and "holds checkpoints" in p.stderr


def test_resume_with_a_different_structural_setting_is_refused(tmp_path):
    out = tmp_path / "run"
    assert train("--total_steps", 1, "--output_dir", out, *FAST).returncode == 0
    p = train("--total_steps", 2, "--output_dir", out, *FAST[:-1], "--disable_wandb", "--weights", "instance_table")
    assert p.returncode == 1 and "--weights" in p.stderr and "domain_table" in p.stderr  # the demo's


def test_qlora_trains_on_cpu_and_rejects_zero3(tmp_path):
    p = train("--mode", "qlora", "--precision", "bf16", "--hypergrad", "exact", "--total_steps", 2,
              "--device", "cpu", "--output_dir", tmp_path / "q", *FAST[2:])  # on a CPU only when asked
    assert p.returncode == 0, p.stderr[-3000:]
    p = train("--mode", "qlora", "--precision", "bf16", "--deepspeed", "ds_configs/zero3.json",
              "--output_dir", tmp_path / "q3")
    assert p.returncode == 2 and "ZeRO-3" in p.stderr




def test_log_shows_progress_without_a_terminal_and_a_finished_run_is_left_alone(tmp_path):
    """Output to a file (as under Slurm): a progress line every log_every updates and a closing
    summary; the same command again says the run is finished and changes nothing."""
    out = tmp_path / "run"
    p = train("--total_steps", 4, "--output_dir", out, *FAST[:-3], "--log_every", 2, "--disable_wandb",
              "--max_length", 4096)
    assert p.returncode == 0, p.stderr[-3000:]
    # one length rule: capped at the tiny model's 1024 positions, said once, used and saved
    assert p.stdout.count("is more than the model takes") == 1 and "(max_length 1024)" in p.stdout
    assert "max_length: 1024" in (out / "config.yaml").read_text()
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("update ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "4/4"]  # the first update, then every log_every
    for ln in lines:
        for part in ("loss ", "meta loss ", "tokens/s ", "ETA "):
            assert part in ln, ln
    assert lines[-1].endswith("ETA 0:00:00")
    summary = [ln for ln in p.stdout.splitlines() if ln.startswith("finished: ")]
    assert len(summary) == 1 and "4 updates" in summary[0] and "step_00000004" in summary[0]
    weights = [json.loads(ln) for ln in (out / "instance_weights.jsonl").open()]
    assert {w["domain"] for w in weights} <= {"clean", "noisy"} and len({w["domain"] for w in weights}) == 2
    status = (out / "status.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()

    p = train("--total_steps", 4, "--output_dir", out, *FAST[:-3], "--wandb_mode", "offline", "--max_length", 4096)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "is finished: checkpoint step_00000004 is at update 4" in p.stdout and "--total_steps" in p.stdout
    assert "resumed" not in p.stdout
    assert (out / "status.json").read_text() == status and (out / "metrics.jsonl").read_text() == metrics
    assert not (out / "wandb").exists()


def test_gradient_checkpointing_under_zero3_lora_both_kinds(tmp_path):
    """recipes/minif2f.yaml's setting: ZeRO-3 + LoRA + activation checkpointing on 2 ranks, non-reentrant
    (default) and reentrant (--gc_reentrant); the meta pass runs in eval mode, where nothing is
    recomputed. Recomputing changes no number: the metrics equal a run without checkpointing."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    rows = {}
    for name, flags in (("plain", []), ("gc", ["--gradient_checkpointing"]),
                        ("gc_reentrant", ["--gradient_checkpointing", "--gc_reentrant"])):
        p = subprocess.run([*torchrun, "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--total_steps", "2",
                            "--output_dir", str(tmp_path / name), *FAST, *flags], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, name + p.stdout[-2000:] + p.stderr[-3000:]
        rows[name] = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        cfg = (tmp_path / name / "config.yaml").read_text()
        assert ("gradient_checkpointing: true" in cfg) == bool(flags)
        assert ("gc_reentrant: true" in cfg) == (name == "gc_reentrant")
    for name in ("gc", "gc_reentrant"):
        assert [r["step"] for r in rows[name]] == [1, 2]
        for a, b in zip(rows["plain"], rows[name]):
            for key in ("loss", "meta_loss", "v_norm"):
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (name, key)


def test_fused_hypergradient_trains_with_accumulation(tmp_path):
    out = tmp_path / "f"
    p = train("--hypergrad", "fused", "--grad_accum", 2, "--meta_interval", 2, "--total_steps", 4,
              "--lora_dropout", "0.1", "--output_dir", out, *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    metas = [r.get("meta_loss") for r in rows]
    assert all(m is not None and m == m for m in metas[1::2])  # a meta pass at updates 2 and 4
    w = torch.tensor([json.loads(ln)["weight"] for ln in (out / "instance_weights.jsonl").open()])
    assert w.std() > 0  # the weights moved


def test_a_model_folder_without_weights_leaves_status_failed_with_the_error(tmp_path):
    """status.json from the first moment: a run that fails before its first update says so."""
    from dreamprm.tiny import default_tiny_dir

    model = tmp_path / "model"
    model.mkdir()
    for f in default_tiny_dir().iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (model / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    p = train("--model_name", model, "--output_dir", out, "--total_steps", 2, *FAST)
    assert p.returncode == 1 and "lacks weights" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "lacks weights" in status["error"] and str(model) in status["error"]
    assert not (out / "LOCK").exists()


def test_ctrl_c_after_the_log_reader_went_away_still_stops_cleanly(tmp_path):
    """`deepspeed ... | tee log` and Ctrl+C: tee dies first; the run checkpoints and says `stopped`, not
    `failed` with BrokenPipeError. With log_every far away, the first update still prints a progress line."""
    out = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--total_steps", "400", "--save_every", "1000", "--output_dir",
            str(out), *FAST, "--log_every", "1000"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("update 1/400  loss "):
            break
    proc.stdout.close()  # the reader (tee) is gone
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "BrokenPipeError" not in stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and checkpoint.latest(out / "checkpoints").name == f"step_{status['step']:08d}"
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""


def test_epochs_resolve_total_steps_once_from_the_examples_kept(tmp_path):
    import yaml

    out = tmp_path / "run"
    p = train("--epochs", "0.05", "--output_dir", out, *FAST)  # 240 demo examples, 2 per update
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("--epochs 0.05: 240 training examples, 2 per update (batch_size 2 x grad_accum 1 x 1 ranks) -> "
            "total_steps 6") in p.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["epochs"], saved["total_steps"]) == (0.05, 6)
    assert json.loads((out / "status.json").read_text())["total_steps"] == 6
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    p = train("--epochs", "0.05", "--output_dir", out, *FAST)
    assert p.returncode == 0 and "is finished: checkpoint step_00000006 is at update 6" in p.stdout
    assert "--epochs 0.1" in p.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DEMO = ["--train_file", ROOT / "dreamprm/demo/train.jsonl", "--train_format", "minif2f", "--precision", "fp32",
        "--disable_wandb", "--log_every", "5"]


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    """Weights learned by a PRM smaller than the built-in tiny one (hidden 32, 1 layer vs 64, 2)."""
    from dreamprm.tiny import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("proxy")
    model = make_tiny_checkpoint(tmp / "model", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    out = tmp / "run"
    p = train(*DEMO, "--meta_file", ROOT / "dreamprm/demo/meta.jsonl", "--meta_format", "minif2f",
              "--model_name", model, "--mode", "full", "--total_steps", "20", "--batch_size", "8",
              "--meta_batch_size", "4", "--meta_lr", "0.5", "--output_dir", out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    learned = {r["id"]: r["weight"] for r in map(json.loads, (out / "instance_weights.jsonl").open())}
    assert len(learned) == 240 and max(learned.values()) - min(learned.values()) > 0.05  # they moved
    return out, learned


def used_weights(run: Path, ranks: int) -> dict:
    """id -> the loss weight each training record got in its last update (TrainState.last_w of every rank)."""
    ck = checkpoint.resume_candidates(run / "checkpoints")[0][0]
    last = torch.stack([torch.load(ck / checkpoint.rank_file(r), weights_only=True)["last_w"] for r in range(ranks)])
    last = last.max(0).values
    index = {r["id"]: r["index"] for r in map(json.loads, (run / "instance_weights.jsonl").open())}
    assert (last >= 0).all()  # every record was trained on
    return {rid: last[i].item() for rid, i in index.items()}


def test_weights_transferred_from_a_smaller_prm_are_the_loss_weights_of_every_update(proxy_run, tmp_path):
    proxy, learned = proxy_run
    out = tmp_path / "target"
    args = [*DEMO, "--weights_from", proxy, "--mode", "full", "--total_steps", "30", "--batch_size", "8",
            "--output_dir", out]
    p = train(*args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "matched by record id" in p.stdout and "weights fixed (transferred)" in p.stdout
    assert used_weights(out, 1) == pytest.approx(learned, abs=0)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").open()]
    assert not any("meta_loss" in r for r in rows)  # no meta pass
    # resuming checks the weights: the same ones continue, changed ones are refused
    p = train(*args[:-4], "--total_steps", "35", "--batch_size", "8", "--output_dir", out)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    w = proxy / "instance_weights.jsonl"
    saved = w.read_text()
    try:
        rows = [json.loads(ln) for ln in saved.splitlines()]
        rows[0]["weight"] += 0.5
        w.write_text("".join(json.dumps(r) + "\n" for r in rows))
        p = train(*args[:-4], "--total_steps", "40", "--batch_size", "8", "--output_dir", out)
        assert p.returncode == 1
        assert "--weights_from now gives other weights than the run trained with (1 of 240" in p.stderr
    finally:
        w.write_text(saved)


def test_transferred_weights_under_two_rank_zero3_lora(proxy_run, tmp_path):
    proxy, learned = proxy_run
    out = tmp_path / "zero3"
    p = subprocess.run([*TORCHRUN, "launch/train.py", *map(str, DEMO), "--weights_from", str(proxy),
                        "--deepspeed", "ds_configs/zero3.json", "--mode", "lora", "--lora_dropout", "0",
                        "--total_steps", "30", "--batch_size", "4", "--output_dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "ZeRO stage 3" in p.stdout
    assert used_weights(out, 2) == pytest.approx(learned, abs=0)


def test_transferred_weights_with_packing_and_a_curriculum_sampler(proxy_run, tmp_path):
    """The fixed weights go with the example, whatever draws the batches and however they are laid out."""
    proxy, learned = proxy_run
    out = tmp_path / "packed"
    p = train(*DEMO, "--weights_from", proxy, "--mode", "lora", "--packing", "--curriculum", "length",
              "--curriculum_start", "1.0", "--total_steps", "40", "--batch_size", "8", "--output_dir", out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ck = checkpoint.resume_candidates(out / "checkpoints")[0][0]
    last = torch.load(ck / checkpoint.rank_file(0), weights_only=True)["last_w"]
    index = {r["id"]: r["index"] for r in map(json.loads, (out / "instance_weights.jsonl").open())}
    seen = {rid: last[i].item() for rid, i in index.items() if last[i] >= 0}
    assert len(seen) > 100 and seen == pytest.approx({rid: learned[rid] for rid in seen}, abs=0)


def test_transferred_weights_with_two_sources_drawn_by_temperature(proxy_run, tmp_path):
    """The proxy learned on one file; the target mixes its two halves as two sources (--mix temperature): every
    record keeps the weight learned for its id, whichever source's draw brought it."""
    proxy, learned = proxy_run
    lines = (ROOT / "dreamprm/demo/train.jsonl").read_text().splitlines(keepends=True)
    halves = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    halves[0].write_text("".join(lines[:80]))
    halves[1].write_text("".join(lines[80:]))
    out = tmp_path / "mixed"
    p = train("--train_file", halves[0], "--train_file", halves[1], *DEMO[2:], "--weights_from", proxy,
              "--mix", "temperature", "--mix_alpha", "0", "--mode", "full", "--total_steps", "30",
              "--batch_size", "8", "--output_dir", out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "matched by record id" in p.stdout
    ck = checkpoint.resume_candidates(out / "checkpoints")[0][0]
    last = torch.load(ck / checkpoint.rank_file(0), weights_only=True)["last_w"]
    rows = [json.loads(ln) for ln in (out / "instance_weights.jsonl").open()]
    seen = {r["id"]: last[r["index"]].item() for r in rows if last[r["index"]] >= 0}
    first = {json.loads(ln)["id"] for ln in lines[:80]}
    assert len(seen.keys() & first) > 40 and len(seen.keys() - first) > 40  # both sources drawn (uniformly: alpha 0)
    assert seen == pytest.approx({rid: learned[rid] for rid in seen}, abs=0)


def test_transfer_from_other_data_or_with_records_left_over_is_refused(proxy_run, tmp_path):
    proxy, _ = proxy_run
    other = tmp_path / "other.jsonl"
    lines = (ROOT / "dreamprm/demo/train.jsonl").read_text().splitlines()
    other.write_text("\n".join(lines[:200]) + "\n")  # 40 records fewer: their rows name records it lacks
    p = train("--train_file", other, *DEMO[2:], "--weights_from", proxy, "--total_steps", "2",
              "--output_dir", tmp_path / "a")
    assert p.returncode == 1
    assert "40 of 240 rows" in p.stderr and str(other) in p.stderr and "demo/train.jsonl" in p.stderr
    assert "Traceback" not in p.stderr


def test_two_runs_in_one_process_pair_and_the_groups_go_before_the_interpreter(tmp_path):
    """2 ranks, ZeRO-3, fit twice in the same processes (a notebook, a sweep): both finish. The process groups
    are destroyed at exit, ahead of the interpreter's teardown (left to it, gloo's threads aborted a rank that
    had finished: SIGABRT, "terminate called without an active exception"). atexit runs handlers last in first
    out, so the one registered before fit sees what fit's own handler left."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import atexit, os, sys, torch.distributed as td\n"
        "atexit.register(lambda: print('at exit: group left', td.is_initialized(), flush=True))\n"
        "from dreamprm.cli import train\n"
        "for n in range(2):\n"
        "    rc = train(sys.argv[1:] + ['--output_dir', f'" + str(tmp_path) + "/run{n}'])\n"
        "    sys.stdout.flush()\n"  # the two ranks share one pipe: the marker in one write, not split by the other's
        "    os.write(1, f'run {n} exit {rc}\\n'.encode())\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *FAST, "--total_steps", "1", "--deepspeed", "ds_configs/zero3.json"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count("run 0 exit 0") == p.stdout.count("run 1 exit 0") == 2, p.stdout[-3000:]
    assert p.stdout.count("at exit: group left False") == 2, p.stdout[-3000:]
    for n in range(2):
        assert json.loads((tmp_path / f"run{n}" / "status.json").read_text())["state"] == "finished"
