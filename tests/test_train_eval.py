"""dreamprm.train_eval: the evaluation on --eval_file during training (sharding, metrics by hand, encoding).

Its use in a real 2-rank ZeRO-3 run, compared with scoring the checkpoint afterwards, is in test_export.py.
"""

import math

import pytest
import torch

from dreamprm import metrics as M
from dreamprm.config import Config
from dreamprm.data.record import Record, write_jsonl
from dreamprm.data.tokenize import Example, domain_table
from dreamprm.errors import DataError
from dreamprm.tiny import make_tiny_tokenizer
from dreamprm.train_eval import eval_step_metrics, load_eval_examples, shard_batches


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def records(n):
    steps = ["48 / 2 = 24.", "Then 48 + 24 = 72.", "The answer is \\boxed{72}."]
    return [Record(id=f"r{i}", question=f"How many clips? ({i})", steps=steps[:1 + i % 3],
                   labels=[1.0, 0.0, None][:1 + i % 3]) for i in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_example_once_with_equal_forward_counts(world):
    for n in range(1, 12):
        for bs in (1, 2, 3):
            per_rank = [shard_batches(list(range(n)), bs, r, world) for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
            seen = sorted(x for b in per_rank for chunk in b for x in chunk)
            assert seen == list(range(n))
            assert all(len(chunk) <= bs for b in per_rank for chunk in b)


def _examples():
    """Hand-made examples: labels 1/0/soft/unlabelled, different step counts."""
    rows = [([1.0, 0.0, 1.0], 9), ([0.0], 5), ([1.0, math.nan], 7), ([0.7, 0.2, 1.0, 0.0], 11), ([math.nan], 4)]
    out = []
    for i, (labels, length) in enumerate(rows):
        pos = list(range(1, 1 + 2 * len(labels), 2))
        out.append(Example(input_ids=list(range(3, 3 + length)), tag_pos=pos, labels=labels, outcome=math.nan,
                           index=i, domain=0, n_steps=len(labels), n_kept=len(labels), id=f"e{i}"))
    return out


def _fake_forward(calls):
    def f(batch):  # logits depend on the ids at the tag positions only
        calls.append(len(batch["ids"]))
        x = torch.gather(batch["input_ids"], 1, batch["tag_pos"]).float()
        return torch.stack([torch.zeros_like(x), torch.sin(x)], -1)
    return f


def test_eval_step_metrics_by_hand():
    ex = _examples()
    calls = []
    got = eval_step_metrics(_fake_forward(calls), ex, batch_size=2, pad_id=0)
    assert calls == [2, 2, 1]
    probs, labels, losses = [], [], []
    for e in ex:
        z = torch.sin(torch.tensor([float(e.input_ids[p]) for p in e.tag_pos]))
        p = torch.sigmoid(z)
        ys = [(pp, y) for pp, y in zip(p.tolist(), e.labels) if not math.isnan(y)]
        probs += [pp for pp, _ in ys]
        labels += [y for _, y in ys]
        if ys:
            losses.append(sum(-(y * math.log(pp) + (1 - y) * math.log(1 - pp)) for pp, y in ys) / len(ys))
    assert got["eval_labelled_steps"] == len(probs) == 9
    assert got["eval_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert got["eval_step_auroc"] == pytest.approx(M.auroc(probs, labels), abs=1e-6)
    assert got["eval_f1"] == pytest.approx(M.f1_at(probs, labels, 0.5)["f1"], abs=1e-6)
    assert got["eval_ece"] == pytest.approx(M.ece(probs, labels, 10)["ece"], abs=1e-6)


def test_eval_step_metrics_needs_a_process_group_for_several_ranks():
    with pytest.raises(RuntimeError, match="world=2 but no process group"):
        eval_step_metrics(_fake_forward([]), _examples(), 2, rank=1, world=2)


def test_eval_file_is_encoded_like_training_data_and_needs_labels(tok, tmp_path):
    cfg = Config()
    cfg.data.eval_file = str(tmp_path / "eval.jsonl")
    recs = records(4)
    recs[0].domain = "algebra"  # a domain the training data does not have is fine
    write_jsonl(recs, cfg.data.eval_file)
    ex, st = load_eval_examples(cfg, tok, domain_table(["geometry"]))
    assert [e.id for e in ex] == [r.id for r in recs] and st.n_kept == 4
    cfg.data.max_length = max(len(e.input_ids) for e in ex) - 1  # cut at a step boundary like training data
    ex, st = load_eval_examples(cfg, tok, domain_table([]))
    assert st.n_kept == 4 and st.n_truncated == 1
    cfg.data.max_length = 5
    with pytest.raises(DataError, match="no example fits"):
        load_eval_examples(cfg, tok, domain_table([]))
    write_jsonl([Record(id="u", question="q", steps=["s"], labels=[None], outcome=1.0)], cfg.data.eval_file)
    with pytest.raises(DataError, match="no record has step labels"):
        load_eval_examples(cfg, tok, domain_table([]))
