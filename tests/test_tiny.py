"""The built-in tiny checkpoint and tokenizer: local, deterministic, cached, Qwen-like."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from dreamprm.tiny import (
    CHAT_TEMPLATE,
    CORPUS,
    IM_END,
    IM_START,
    PAD,
    STEP_TAG,
    TINY_FILES,
    default_tiny_dir,
    make_tiny_checkpoint,
    make_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def test_tokenizer_special_tokens_and_tag(tok):
    assert 512 <= len(tok) <= 1000
    assert tok.pad_token == PAD and tok.eos_token == IM_END
    for t in (PAD, IM_START, IM_END, STEP_TAG):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    tag = tok.convert_tokens_to_ids(STEP_TAG)
    ids = tok.encode("x = 6.<extra_0>So 2x = 12.<extra_0>", add_special_tokens=False)
    assert ids.count(tag) == 2 and ids[-1] == tag
    assert tok.encode("x = 6", add_special_tokens=True) == tok.encode("x = 6", add_special_tokens=False)


def test_tokenizer_round_trip_and_determinism(tok):
    text = " ".join(CORPUS) + "\n\nhéllo 123 \\boxed{7}"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert make_tiny_tokenizer().encode(text) == tok.encode(text)


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("prm", [False, True])
def test_checkpoint_files_and_reload(tmp_path, tok, prm):
    out = make_tiny_checkpoint(tmp_path / "m", prm=prm)
    cfg = AutoConfig.from_pretrained(out, local_files_only=True)
    assert cfg.model_type == "qwen2" and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    # a head size vLLM's CPU attention takes (32, 64, 80, ...; 16 fails on the first forward pass)
    assert cfg.hidden_size // cfg.num_attention_heads == 32 and cfg.num_key_value_heads == 1
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    sd = load_file(str(out / "model.safetensors"))
    if prm:
        assert cfg.architectures == ["Qwen2ForProcessRewardModel"]
        assert {k for k in sd if not k.startswith("model.")} == {
            "score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}
    else:
        assert cfg.architectures == ["Qwen2ForCausalLM"] and "score.0.weight" not in sd
    # AutoTokenizer rebuilds a Qwen2Tokenizer for model_type qwen2: encodings must not change.
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = " ".join(CORPUS) + "<extra_0>\n\n<|im_end|>"
    assert tok2.encode(text) == tok.encode(text) and tok2.chat_template == CHAT_TEMPLATE


def test_checkpoint_seeded_and_rng_untouched(tmp_path):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    make_tiny_checkpoint(tmp_path / "a", seed=1)
    assert torch.equal(torch.rand(1), before)  # building does not consume the caller's RNG
    make_tiny_checkpoint(tmp_path / "b", seed=1)
    make_tiny_checkpoint(tmp_path / "c", seed=2)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])


def test_default_dir_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMPRM_CACHE", str(tmp_path))
    d = default_tiny_dir()
    assert d.parent == tmp_path and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert default_tiny_dir() == d and (d / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temporary folder left behind
    p = default_tiny_dir(prm=True)
    assert p != d and "prm" in p.name
    assert json.loads((p / "config.json").read_text())["architectures"] == ["Qwen2ForProcessRewardModel"]


def _build_on_rank(rank, store_path, cache):
    import torch.distributed as dist

    os.environ["DREAMPRM_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        make_tiny_checkpoint(Path(cache).parent / f"rank{rank}")  # each rank its own: rank 1's is the one at risk
        default_tiny_dir()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_first_run_builds_a_whole_folder(tmp_path):
    """A fresh cache, two ranks in one process group: transformers 5 writes no weights from rank 1 through
    save_pretrained, and a rank-1 folder without weights once won the rename and broke every later run."""
    import torch.multiprocessing as mp

    cache = tmp_path / "cache"
    mp.spawn(_build_on_rank, args=(str(tmp_path / "store"), str(cache)), nprocs=2)
    (cached,) = cache.iterdir()
    ref = load_file(str(make_tiny_checkpoint(tmp_path / "ref") / "model.safetensors"))
    for d in (tmp_path / "rank0", tmp_path / "rank1", cached):
        assert all((d / f).is_file() for f in TINY_FILES), (d, sorted(p.name for p in d.iterdir()))
        got = load_file(str(d / "model.safetensors"))
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_an_incomplete_cached_folder_is_named_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMPRM_CACHE", str(tmp_path))
    d = default_tiny_dir()
    (d / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match=r"incomplete tiny-model folder .*model\.safetensors.*delete it"):
        default_tiny_dir()
