"""Sample packing: layout, and packed == padded per-example logits, losses and gradients (fp32)."""

import functools
import importlib.util
import math

import pytest
import torch

from dreamprm import hypergrad
from dreamprm.config import ModelConfig
from dreamprm.data.loader import BatchStream, collate
from dreamprm.data.packing import (
    check_attention,
    collate_packed,
    is_packed,
    pack_rows,
    padding_stats,
    select,
)
from dreamprm.data.tokenize import Example
from dreamprm.model import build_prm
from dreamprm.tiny import STEP_TAG, make_tiny_checkpoint

PAD = 0
LENGTHS = [37, 5, 64, 12, 23, 50, 8, 41]


def examples(lengths=LENGTHS, tag=3, vocab=600, seed=0):
    """Random token ids with 1-4 step tags each (the last at the end), mixed labels incl. unlabelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, vocab, (n,), generator=g)
        k = min(n, 1 + i % 4)
        pos = sorted({n - 1, *torch.randint(0, n, (k - 1,), generator=g).tolist()})
        ids[pos] = tag
        labels = [float(torch.rand((), generator=g) > 0.5) for _ in pos]
        if len(pos) > 1:
            labels[0] = math.nan
        out.append(Example(ids.tolist(), pos, labels, float(i % 2), 100 + i, i % 3, len(pos), len(pos), f"r{i}"))
    return out


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows(LENGTHS, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= 64 for r in rows)
    assert len(rows) == math.ceil(sum(LENGTHS) / 64)  # 240 tokens fit in 4 rows of 64
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 70], 64)


def test_collate_packed_layout():
    exs = examples()
    p, u = collate_packed(exs, PAD), collate(exs, PAD)
    assert is_packed(p) and not is_packed(u) and p["attention_mask"] is None
    r, s = p["input_ids"].shape
    assert s == max(LENGTHS) and r < len(exs)
    flat_ids, flat_pos = p["input_ids"].flatten(), p["position_ids"].flatten()
    for i, e in enumerate(exs):  # each example is contiguous, positions restart at 0
        start = int(p["seq_row"][i]) * s + int(p["seq_start"][i])
        assert flat_ids[start:start + len(e.input_ids)].tolist() == e.input_ids
        assert flat_pos[start:start + len(e.input_ids)].tolist() == list(range(len(e.input_ids)))
        m = len(e.tag_pos)
        assert (p["tag_pos"][i, :m] - start).tolist() == e.tag_pos
    assert (flat_ids[p["tag_pos"][p["step_mask"]]] == 3).all()
    for k in ("step_mask", "label_mask", "labels", "outcome", "index", "domain"):  # same order as collate
        assert torch.equal(p[k].nan_to_num(-1.0), u[k].nan_to_num(-1.0)), k
    assert p["ids"] == u["ids"] and p["n_tokens"] == u["n_tokens"] == sum(LENGTHS)
    one = collate_packed(exs, PAD, one_row=True)
    assert one["input_ids"].shape == (1, sum(LENGTHS))
    with pytest.raises(ValueError, match="pad"):
        collate_packed(exs, None)


def test_select_gives_the_padded_batch_of_one():
    exs = examples()
    p = collate_packed(exs, PAD)
    for i, e in enumerate(exs):
        one, ref = select(p, i), collate([e], PAD)
        assert torch.equal(one["input_ids"], ref["input_ids"])
        m = len(e.tag_pos)
        assert one["tag_pos"][0, :m].tolist() == e.tag_pos and not one["step_mask"][0, m:].any()
        assert torch.equal(one["labels"][:, :m], ref["labels"]) and one["index"].tolist() == [e.index]


def test_padding_stats_arithmetic():
    st = padding_stats([10, 2, 8, 4], batch_size=2)  # batches [10, 2], [8, 4]
    assert st["tokens"] == 24 and st["slots_padded"] == 2 * 10 + 2 * 8
    assert st["waste_padded"] == pytest.approx(1 - 24 / 36)
    assert st["slots_packed"] == 36  # rows of at most the longest: [10] [2] | [8] [4], nothing to gain
    st = padding_stats([6, 2, 3, 1], batch_size=4)  # one batch, rows of 6: [6] [3, 2, 1]
    assert st["slots_packed"] == 12 and st["rows_per_batch"] == 2
    assert st["attn_padded_over_need"] == pytest.approx(4 * 36 / (36 + 4 + 9 + 1))


def test_batch_stream_packs():
    exs = examples()
    stream = BatchStream(exs, 4, PAD, seed=1, collate_fn=functools.partial(collate_packed, one_row=True))
    b = next(stream)
    assert is_packed(b) and b["input_ids"].shape[0] == 1 and len(b["index"]) == 4


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lm"), hidden=64, layers=2)


def _prm(path, attn, mode):
    torch.manual_seed(0)
    prm, tok = build_prm(ModelConfig(name_or_path=str(path), mode=mode, attn_implementation=attn, lora_r=4,
                                     lora_dropout=0.0), "fp32")
    if mode == "lora":  # B starts at zero: make the adapters matter
        with torch.no_grad():
            for n, p in prm.named_parameters():
                if "lora_B" in n:
                    p.add_(0.1 * torch.randn_like(p))
    return prm.eval(), tok


def _losses_and_grads(prm, b):
    params = [p for p in prm.parameters() if p.requires_grad]
    logits = prm(b["input_ids"], b["attention_mask"], b["tag_pos"], b.get("position_ids"))
    losses = hypergrad.instance_losses(logits, b)
    grads = torch.autograd.grad(losses.sum(), params)
    return logits.detach(), losses.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("attn,mode", [("sdpa", "lora"), ("eager", "full"), ("sdpa", "full")])
@pytest.mark.parametrize("one_row", [False, True])
def test_packed_equals_padded_per_example(lm_dir, attn, mode, one_row):
    check_attention(attn)
    prm, tok = _prm(lm_dir, attn, mode)
    exs = examples(tag=tok.convert_tokens_to_ids(STEP_TAG), vocab=len(tok) - 8)
    u, p = collate(exs, tok.pad_token_id), collate_packed(exs, tok.pad_token_id, one_row=one_row)
    lu, xu, gu = _losses_and_grads(prm, u)
    lp, xp, gp = _losses_and_grads(prm, p)
    assert lp.shape == lu.shape == (len(exs), u["tag_pos"].shape[1], 2)
    m = u["step_mask"]
    torch.testing.assert_close(lp[m], lu[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(xp, xu, atol=1e-5, rtol=0)  # per-example losses, original order
    torch.testing.assert_close(gp, gu, atol=1e-5, rtol=1e-4)
    # and the exact method's per-instance batches cut from the packed batch give the same losses
    for i in (0, 3):
        one = select(p, i)
        li = hypergrad.instance_losses(prm(one["input_ids"], one["attention_mask"], one["tag_pos"]), one)
        torch.testing.assert_close(li.detach(), xu[i:i + 1], atol=1e-5, rtol=0)


def test_without_restarting_positions_examples_would_leak(lm_dir):
    """Control: the same packed rows with plain 0..S-1 positions (one causal sequence per row)
    change the losses, so the equality above really comes from the per-example mask."""
    prm, tok = _prm(lm_dir, "sdpa", "full")
    exs = examples(tag=tok.convert_tokens_to_ids(STEP_TAG), vocab=len(tok) - 8)
    p = collate_packed(exs, tok.pad_token_id)
    _, xp, _ = _losses_and_grads(prm, p)
    leak = dict(p, position_ids=torch.arange(p["input_ids"].shape[1]).expand_as(p["input_ids"]).contiguous())
    _, xl, _ = _losses_and_grads(prm, leak)
    assert (xl - xp).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs CUDA and flash-attn")
def test_packed_equals_padded_flash_attention(lm_dir):
    """flash_attention_2 varlen (one row): bf16 kernels, so a bf16-level tolerance."""
    torch.manual_seed(0)
    prm, tok = build_prm(ModelConfig(name_or_path=str(lm_dir), mode="full", attn_implementation="flash_attention_2"),
                         "bf16")
    prm = prm.cuda().eval()
    exs = examples(tag=tok.convert_tokens_to_ids(STEP_TAG), vocab=len(tok) - 8)
    u = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(exs, tok.pad_token_id).items()}
    p = {k: v.cuda() if torch.is_tensor(v) else v
         for k, v in collate_packed(exs, tok.pad_token_id, one_row=True).items()}
    with torch.no_grad():
        xu = hypergrad.instance_losses(prm(u["input_ids"], u["attention_mask"], u["tag_pos"]), u)
        xp = hypergrad.instance_losses(prm(p["input_ids"], None, p["tag_pos"], p["position_ids"]), p)
    torch.testing.assert_close(xp, xu, atol=2e-2, rtol=0)
