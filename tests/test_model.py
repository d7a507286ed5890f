"""PRM module, builder and export/import, on the tiny Qwen2 (CPU, fp32 unless stated)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Model

from dreamprm.config import ModelConfig
from dreamprm.errors import ModelError
from dreamprm.model import (
    PRM,
    build_prm,
    load_prm,
    load_tokenizer,
    resolve_attn,
    save_adapter,
    save_prm,
    state_dict_for_export,
    step_probs,
)
from dreamprm.tiny import make_tiny_checkpoint

HEAD = {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}
TEXTS = ["Let x be 6.<extra_0>So 2x = 12.<extra_0>The answer is 12.<extra_0>", "3 + 4 = 7.<extra_0>"]


def _has_bnb():
    try:
        import bitsandbytes  # noqa: F401
        return True
    except (ImportError, RuntimeError, OSError):
        return False


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prm"), prm=True, seed=3)


def cfg(path, **kw):
    kw.setdefault("lora_r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("lora_dropout", 0.0)
    return ModelConfig(name_or_path=str(path), **kw)


def batch(tok, texts=TEXTS, tag_text="<extra_0>"):
    """Right-padded batch with tag positions, as the collate contract lays it out."""
    tag = tok.convert_tokens_to_ids(tag_text)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    S, K = max(map(len, ids)), max(i.count(tag) for i in ids)
    input_ids = torch.full((len(ids), S), tok.pad_token_id)
    mask = torch.zeros(len(ids), S, dtype=torch.long)
    tag_pos = torch.zeros(len(ids), K, dtype=torch.long)
    for b, seq in enumerate(ids):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        pos = [i for i, t in enumerate(seq) if t == tag]
        tag_pos[b, :len(pos)] = torch.tensor(pos)
    return input_ids, mask, tag_pos


def perturb_lora(prm):
    """LoRA B starts at zero; make the adapters matter so merge/export are really tested."""
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in prm.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn_like(p))


def scores(prm, b):
    with torch.no_grad():
        return prm.eval()(*b)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_forward_backward(lm_dir, mode):
    if mode == "qlora" and not _has_bnb():
        pytest.skip("bitsandbytes does not import")
    torch.manual_seed(0)
    prm, tok = build_prm(cfg(lm_dir, mode=mode), "fp32")
    assert prm.training and not hasattr(prm.model, "lm_head")
    b = batch(tok)
    logits = prm(*b)
    assert logits.shape == (2, 3, 2) and logits.dtype == torch.float32
    p = step_probs(logits)
    assert p.shape == (2, 3) and ((p > 0) & (p < 1)).all()
    logits.sum().backward()
    trainable = {n for n, p in prm.named_parameters() if p.requires_grad}
    assert HEAD <= trainable and all(prm.get_parameter(n).grad is not None for n in trainable)
    if mode == "full":
        assert trainable == {n for n, _ in prm.named_parameters()}
    else:
        assert trainable - HEAD and all("lora_" in n for n in trainable - HEAD)
    if mode == "qlora":
        import bitsandbytes as bnb
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in prm.modules())


def test_logits_only_at_tags_and_causal(lm_dir):
    torch.manual_seed(0)
    prm, tok = build_prm(cfg(lm_dir, mode="full"), "fp32")
    ids, mask, tag_pos = batch(tok, TEXTS[:1])
    ref = scores(prm, (ids, mask, tag_pos))
    longer = torch.cat([ids, torch.tensor([[17, 18]])], 1)  # tokens after the last tag change nothing
    assert torch.equal(scores(prm, (longer, torch.ones_like(longer), tag_pos)), ref)
    t0, t1 = tag_pos[0, :2].tolist()
    edited = ids.clone()
    edited[0, (t0 + t1) // 2] = (edited[0, (t0 + t1) // 2] + 1) % 300  # a token inside step 2
    out = scores(prm, (edited, mask, tag_pos))
    assert torch.equal(out[0, 0], ref[0, 0]) and (out[0, 1:] - ref[0, 1:]).abs().amax(-1).min() > 0


def test_state_dict_layout(lm_dir):
    torch.manual_seed(0)
    full, _ = build_prm(cfg(lm_dir, mode="full"), "fp32")
    keys = set(full.state_dict())
    assert HEAD <= keys and all(k.startswith("model.") for k in keys - HEAD)
    assert set(state_dict_for_export(full)) == keys
    lora, _ = build_prm(cfg(lm_dir, mode="lora"), "fp32")
    exported = state_dict_for_export(lora)
    assert set(exported) == keys  # no lora_*, base_layer or peft prefixes
    assert all(exported[k].shape == v.shape for k, v in full.state_dict().items())


def perturbed_prm(lm_dir, mode, texts=TEXTS):
    """A seeded PRM whose adapters matter, a batch of texts and its reference scores."""
    torch.manual_seed(0)
    prm, tok = build_prm(cfg(lm_dir, mode=mode), "fp32")
    perturb_lora(prm)
    b = batch(tok, texts)
    return prm, tok, b, scores(prm, b)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_save_load_merged_same_scores(lm_dir, tmp_path, mode):
    if mode == "qlora" and not _has_bnb():
        pytest.skip("bitsandbytes does not import")
    prm, tok, b, ref = perturbed_prm(lm_dir, mode)
    save_prm(prm, tmp_path / "out", tok, "<extra_0>")
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == ["Qwen2ForProcessRewardModel"] and conf["num_labels"] == 2
    assert conf["dreamprm_step_tag"] == "<extra_0>" and "quantization_config" not in conf
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == set(state_dict_for_export(prm))
    prm2, tok2, tag = load_prm(tmp_path / "out")
    assert tag == "<extra_0>" and tok2.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    torch.testing.assert_close(scores(prm2, b), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_save_load_adapter_same_scores(lm_dir, tmp_path, mode):
    if mode == "qlora" and not _has_bnb():
        pytest.skip("bitsandbytes does not import")
    prm, tok, b, ref = perturbed_prm(lm_dir, mode)
    out = save_prm(prm, tmp_path / "ad", tok, "<extra_0>", merge_lora=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "score.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert all(v.numel() > 0 for v in load_file(str(out / "adapter_model.safetensors")).values())
    prm2, _, tag = load_prm(out)
    assert tag == "<extra_0>"
    torch.testing.assert_close(scores(prm2, b), ref, atol=1e-6, rtol=0)


def test_matches_plain_qwen2_reading_of_export(lm_dir, tmp_path):
    """The exported folder means the same to code that knows only the Qwen2ForProcessRewardModel layout."""
    prm, tok, b, ref = perturbed_prm(lm_dir, "lora", TEXTS[:1])
    save_prm(prm, tmp_path / "out", tok, "<extra_0>")
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = Qwen2Model.from_pretrained(tmp_path / "out", dtype=torch.float32, local_files_only=True).eval()
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    head.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("score.")})
    with torch.no_grad():
        all_logits = head(base(input_ids=b[0], attention_mask=b[1]).last_hidden_state)  # [1,S,2]
    torch.testing.assert_close(all_logits[0, b[2][0]], ref[0], atol=1e-6, rtol=0)


def test_export_loads_in_plain_transformers_with_remote_code(lm_dir, tmp_path):
    """AutoModel(trust_remote_code=True) on a merged folder is the trained PRM, head included."""
    from transformers import AutoModel, AutoModelForTokenClassification

    torch.manual_seed(0)
    prm, tok = build_prm(cfg(lm_dir, mode="lora"), "fp32")
    perturb_lora(prm)
    b = batch(tok)
    ref_logits = scores(prm, b)
    ref = step_probs(ref_logits)
    out = save_prm(prm, tmp_path / "out", tok, "<extra_0>")
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["Qwen2ForProcessRewardModel"]  # the vLLM layout is kept
    assert conf["auto_map"]["AutoModel"] == "modeling_dreamprm.DreamPRMForProcessReward"
    assert (out / "modeling_dreamprm.py").is_file()
    for auto in (AutoModel, AutoModelForTokenClassification):
        model = auto.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                     local_files_only=True).eval()
        assert type(model).__name__ == "DreamPRMForProcessReward"
        with torch.no_grad():
            logits = model(input_ids=b[0], attention_mask=b[1]).logits  # [B, S, 2]
        got = [logits[i, b[2][i]].softmax(-1)[:, 1] for i in range(len(TEXTS))]
        for i, k in enumerate([3, 1]):  # tags per text
            torch.testing.assert_close(got[i][:k], ref[i][:k], atol=1e-5, rtol=0)
        helper = model.step_scores(b[0], b[1])
        assert [len(h) for h in helper] == [3, 1]
        torch.testing.assert_close(torch.tensor(helper[0]), ref[0][:3], atol=1e-5, rtol=0)
    # the folder keeps loading in dreamprm
    prm2, _, _ = load_prm(out)
    torch.testing.assert_close(scores(prm2, b), ref_logits, atol=1e-6, rtol=0)


def test_lora_build_and_adapter_load_warn_nothing(lm_dir, tmp_path, recwarn):
    """peft's read of transformers' deprecated is_gradient_checkpointing is silenced where it arises."""
    prm, tok = build_prm(cfg(lm_dir, mode="lora"), "fp32")
    load_prm(save_adapter(prm, tmp_path / "ad", tok, "<extra_0>"))
    assert not [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "checkpointing" in str(w.message)]


def test_prm_checkpoint_keeps_head_lm_gets_fresh_seeded_head(lm_dir, prm_dir):
    sd = load_file(str(prm_dir / "model.safetensors"))
    prm, _ = build_prm(cfg(prm_dir, mode="lora"), "fp32")
    for k in ("0.weight", "2.bias"):
        assert torch.equal(prm.score.state_dict()[k], sd["score." + k])
    heads = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        heads.append(build_prm(cfg(lm_dir, mode="full"), "fp32")[0].score[0].weight.detach())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    with pytest.raises(ModelError, match="not a PRM folder"):
        load_prm(lm_dir)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(lm_dir, reentrant):
    res = []
    for gc in (False, True):
        torch.manual_seed(0)
        mcfg = cfg(lm_dir, mode="lora", gradient_checkpointing=gc, gc_reentrant=reentrant)
        prm, tok = build_prm(mcfg, "fp32")
        perturb_lora(prm)
        base = prm.model.get_base_model()
        assert getattr(base, "is_activation_checkpointing", None) in (gc, None)
        assert base.layers[0].gradient_checkpointing == gc
        target = torch.tensor([1, 0, 1, 0, 1, 1])
        loss = torch.nn.functional.cross_entropy(prm(*batch(tok)).flatten(0, 1), target)
        loss.backward()
        res.append((loss.detach(), {n: p.grad for n, p in prm.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-5, rtol=0)
    assert res[0][1].keys() == res[1][1].keys()
    for n in res[0][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], atol=1e-5, rtol=0)


def test_bf16_dtypes(lm_dir):
    torch.manual_seed(0)
    prm, tok = build_prm(cfg(lm_dir, mode="lora"), "bf16")
    dt = {n: p.dtype for n, p in prm.named_parameters()}
    assert all(d == torch.float32 for n, d in dt.items() if "lora_" in n or n.startswith("score."))
    assert all(d == torch.bfloat16 for n, d in dt.items() if "lora_" not in n and not n.startswith("score."))
    out = prm(*batch(tok))
    assert out.dtype == torch.float32
    out.sum().backward()


def test_attn_choices():
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ModelError, match=r"pip install dreamprm\[flash\].*sdpa"):
            resolve_attn("flash_attention_2")
    if not torch.cuda.is_available():
        assert resolve_attn("auto") == "sdpa"
    assert resolve_attn("eager") == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_without_package_fails_clearly(lm_dir):
    with pytest.raises(ModelError, match=r"pip install dreamprm\[flash\]"):
        build_prm(cfg(lm_dir, attn_implementation="flash_attention_2"), "fp32")


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere.*config\.json.*safetensors.*tokenizer"):
        build_prm(cfg(tmp_path / "nowhere"), "fp32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"lacks config\.json, weights.*, tokenizer files"):
        build_prm(cfg(tmp_path / "empty"), "fp32")


def test_gguf_only_or_tokenizerless_folder_says_what_to_do(lm_dir, tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"only GGUF weights \(m\.Q4_1\.gguf\).*dreamprm smollm2 --gguf"):
        build_prm(cfg(tmp_path / "g"), "fp32")
    (tmp_path / "nt").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "nt" / f).write_bytes((lm_dir / f).read_bytes())
    with pytest.raises(ModelError, match=r"lacks tokenizer files.*huggingface-cli download"):
        build_prm(cfg(tmp_path / "nt"), "fp32")


def test_tag_not_single_token_without_add_step_tag(lm_dir):
    with pytest.raises(ModelError, match=r"'<step>'.*" + str(lm_dir) + r".*--add_step_tag"):
        build_prm(cfg(lm_dir, step_tag="<step>", add_step_tag=False), "fp32")


def test_tag_that_merges_with_text_is_made_special_or_refused(tmp_path, merging_tag_tok):
    """A tag that is one word of the vocabulary but merges with its neighbours ("x<extra_0>" is one
    unknown word): registered as a special token it keeps its id (no new embedding row) and stops
    merging; with add_tag off (--no-add_step_tag) it is a ModelError naming tag, tokenizer and text."""
    merging_tag_tok.save_pretrained(tmp_path / "wl")
    tid = merging_tag_tok.convert_tokens_to_ids("<extra_0>")
    with pytest.raises(ModelError, match=r"'<extra_0>'.*merges with neighbouring text in the tokenizer "
                                         r"\w+\(.*wl\): 'x<extra_0>' encodes to"):
        load_tokenizer(tmp_path / "wl", "<extra_0>", add_tag=False)
    tok = load_tokenizer(tmp_path / "wl", "<extra_0>")
    assert tok.convert_tokens_to_ids("<extra_0>") == tid and len(tok) == len(merging_tag_tok)
    assert tok.encode("x<extra_0>", add_special_tokens=False).count(tid) == 1


@pytest.fixture(scope="module")
def full_vocab_dir(lm_dir, tmp_path_factory):
    """The tiny LM with exactly one embedding row per token: an added tag must grow the matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fullvocab")
    tok = AutoTokenizer.from_pretrained(lm_dir)
    m = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    m.resize_token_embeddings(len(tok), mean_resizing=False)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tag_batch(tok, tag):
    """TEXTS with <extra_0> replaced by tag, and the tag positions."""
    return batch(tok, [t.replace("<extra_0>", tag) for t in TEXTS], tag)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_added_step_tag_grows_embeddings_and_survives_export(full_vocab_dir, tmp_path, mode):
    """A tag the tokenizer lacks: added as a special token, one new embedding row = mean of the
    others, the same scores after a merged export and (LoRA / QLoRA) an adapter export."""
    if mode == "qlora" and not _has_bnb():
        pytest.skip("bitsandbytes does not import")
    tag = "<step>"
    torch.manual_seed(0)
    prm, tok = build_prm(cfg(full_vocab_dir, mode=mode, step_tag=tag), "fp32")
    n_old = json.loads((full_vocab_dir / "config.json").read_text())["vocab_size"]
    tid = tok.convert_tokens_to_ids(tag)
    assert tid == n_old == len(tok) - 1 and tok.encode("x" + tag + "y", add_special_tokens=False).count(tid) == 1
    emb = prm.model.get_input_embeddings().weight
    assert emb.shape[0] == n_old + 1
    torch.testing.assert_close(emb[tid].float(), emb[:n_old].float().mean(0), atol=1e-6, rtol=0)
    perturb_lora(prm)
    if mode == "full":  # the new row trains in a full fine-tune: the export must carry it
        with torch.no_grad():
            emb[tid] += 0.5
    b = tag_batch(tok, tag)
    ref = scores(prm, b)
    save_prm(prm, tmp_path / "merged", tok, tag)
    prm2, tok2, tag2 = load_prm(tmp_path / "merged")
    assert tag2 == tag and tok2.convert_tokens_to_ids(tag) == tid
    torch.testing.assert_close(scores(prm2, b), ref, atol=1e-6, rtol=0)
    if mode != "full":
        out = save_prm(prm, tmp_path / "adapter", tok, tag, merge_lora=False)
        prm3, _, _ = load_prm(out)
        torch.testing.assert_close(scores(prm3, b), ref, atol=1e-6, rtol=0)


def test_bad_choices_and_targets_reported(lm_dir):
    bad = dataclasses.replace(cfg(lm_dir), mode="adapters", attn_implementation="fast")
    with pytest.raises(ModelError, match=r"mode 'adapters'.*precision 'fp8'.*attn_implementation 'fast'"):
        build_prm(bad, "fp8")
    with pytest.raises(ModelError, match=r"lora_targets \['c_attn'\].*q_proj"):
        build_prm(cfg(lm_dir, lora_targets=["c_attn"]), "fp32")


def test_save_adapter_needs_lora(lm_dir, tmp_path):
    prm, _ = build_prm(cfg(lm_dir, mode="full"), "fp32")
    with pytest.raises(ValueError, match="LoRA"):
        save_adapter(prm, tmp_path)


def test_default_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMPRM_CACHE", str(tmp_path))
    prm, tok = build_prm(ModelConfig(name_or_path="", mode="full"), "fp32")
    assert isinstance(prm, PRM) and prm(*batch(tok)).shape == (2, 3, 2)


def test_base_fingerprint_names_what_changed(lm_dir, tmp_path):
    import shutil

    from dreamprm.model import base_fingerprint, base_mismatch, checkpoint_holds_base

    assert checkpoint_holds_base(ModelConfig(mode="full", name_or_path=str(lm_dir)))
    assert checkpoint_holds_base(ModelConfig(mode="lora"))  # the built-in model: no folder named
    assert not checkpoint_holds_base(ModelConfig(mode="lora", name_or_path=str(lm_dir)))
    was = base_fingerprint(lm_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(was["files"])
    copy = Path(shutil.copytree(lm_dir, tmp_path / "copy"))
    (copy / "README.md").write_text("not part of the model\n")
    assert base_mismatch(was, base_fingerprint(copy), "x") is None  # same files elsewhere: the same base
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    (copy / "tokenizer.json").unlink()
    (copy / "model-extra.safetensors").write_bytes(b"")
    msg = base_mismatch(was, base_fingerprint(copy), "cannot resume from CKPT")
    assert msg.startswith(f"cannot resume from CKPT: it holds only the trained weights (LoRA adapters, head) and is "
                          f"rebuilt on the base model folder {copy.resolve()} (the run started from "
                          f"{Path(lm_dir).resolve()}), whose files")
    for part in ("tokenizer.json is missing", "model-extra.safetensors is new",
                 f"config.json has {(copy / 'config.json').stat().st_size:,} bytes, the run's base had "
                 f"{(lm_dir / 'config.json').stat().st_size:,}", "Put the original files back"):
        assert part in msg, part
    data = bytearray((lm_dir / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors has the same size but another SHA-256" in base_mismatch(was, base_fingerprint(copy), "x")
