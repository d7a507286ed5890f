"""dreamprm.scoring on the tiny Qwen2 in one process: Scorer, loading errors, the eval used in training.

The scores of a real 2-rank ZeRO-3 run, its export and its in-training evaluation are in test_export.py.
"""

import math

import pytest
import torch

from dreamprm import metrics as M
from dreamprm.config import Config, ModelConfig
from dreamprm.data.readers import DataError
from dreamprm.data.record import Record, write_jsonl
from dreamprm.data.tokenize import Example, domain_table, encode_records, prompt_text
from dreamprm.model import build_prm, step_probs
from dreamprm.scoring import (
    Scorer,
    ScoringError,
    eval_step_metrics,
    load_eval_examples,
    load_scorer,
    path_kind,
    shard_batches,
)

TAG = "<extra_0>"
QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
STEPS = ["48 / 2 = 24.", "Then 48 + 24 = 72.", "The answer is \\boxed{72}."]


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    prm, tok = build_prm(ModelConfig(mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0), "fp32")
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for n, p in prm.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn_like(p))
    return Scorer(prm, tok, TAG, chat_template=True, device="cpu")


def records(n=5):
    return [Record(id=f"r{i}", question=f"{QUESTION} ({i})", steps=STEPS[:1 + i % 3],
                   labels=[1.0, 0.0, None][:1 + i % 3]) for i in range(n)]


def test_score_equals_a_forward_on_the_whole_text(scorer):
    """Independent of encode_records: the text with tags, encoded in one piece, tags found by id."""
    tok = scorer.tokenizer
    text = prompt_text(QUESTION, tok, True) + "".join(s + TAG for s in STEPS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tag_id = tok.convert_tokens_to_ids(TAG)
    pos = [i for i, t in enumerate(ids) if t == tag_id]
    assert len(pos) == len(STEPS)
    with torch.no_grad():
        ref = step_probs(scorer.prm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                    torch.tensor([pos])))[0]
    got = scorer.score(QUESTION, STEPS)
    assert len(got) == len(STEPS)
    torch.testing.assert_close(torch.tensor(got), ref, atol=1e-6, rtol=0)
    assert scorer.prm.training is False


def test_batching_and_order_do_not_change_scores(scorer):
    recs = records(7)
    one = scorer.score_records(recs, batch_size=1)
    many = scorer.score_records(recs[::-1], batch_size=3)
    assert list(one) == [r.id for r in recs] and list(many) == [r.id for r in recs[::-1]]
    for r in recs:
        assert len(one[r.id]) == len(r.steps)
        torch.testing.assert_close(torch.tensor(many[r.id]), torch.tensor(one[r.id]), atol=1e-5, rtol=0)
    batch = scorer.score_batch([(r.question, r.steps) for r in recs], batch_size=4)
    assert [pytest.approx(one[r.id], abs=1e-5) for r in recs] == batch


def test_aggregations_are_the_metrics_ones(scorer):
    steps = scorer.score(QUESTION, STEPS)
    for how in M.AGGREGATIONS:
        assert scorer.score_solution(QUESTION, STEPS, how) == M.aggregate(steps, how)
    with pytest.raises(ValueError, match="unknown aggregation"):
        scorer.score_solution(QUESTION, STEPS, "max")


def test_solutions_are_never_cut(scorer):
    recs = records(3) + [Record(id="long2", question=QUESTION, steps=["x = 1.", "y = 2. " * 40], labels=[1.0, 1.0]),
                         Record(id="long1", question=QUESTION, steps=["y = 2. " * 40], labels=[1.0])]
    full, _ = encode_records(recs, scorer.tokenizer, TAG, 10**6, True)
    fits = max(len(e.input_ids) for e in full[:3])
    assert fits < len(full[3].input_ids)
    short = Scorer(scorer.prm, scorer.tokenizer, TAG, max_length=fits)
    with pytest.raises(ScoringError, match=rf"2 solution\(s\) do not fit in max_length {fits} .*Not scored: "
                       r"'long1' \(not even its first step fits\), 'long2' \(1 of 2 steps fit\)\."):
        short.score_records(recs)
    assert set(short.score_records(recs[:3])) == {"r0", "r1", "r2"}


def test_bad_records_are_errors(scorer):
    with pytest.raises(ScoringError, match="step tag"):
        scorer.score(QUESTION, ["a" + TAG + "b"])
    with pytest.raises(ScoringError, match="repeated: \\['r0'\\]"):
        scorer.score_records(records(2) + records(1))
    with pytest.raises(ScoringError, match="batch_size"):
        scorer.score_records(records(2), batch_size=0)


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ScoringError, match="does not exist"):
        load_scorer(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ScoringError, match="is a file"):
        load_scorer(tmp_path / "f.txt")
    with pytest.raises(ScoringError, match="not a run directory .* a checkpoint folder .* or a model folder"):
        load_scorer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert path_kind(tmp_path) == "model"
    with pytest.raises(ScoringError, match="does not record its step tag"):
        load_scorer(tmp_path)


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


def test_eval_file_is_encoded_like_training_data_and_needs_labels(scorer, tmp_path):
    cfg = Config()
    cfg.data.eval_file = str(tmp_path / "eval.jsonl")
    recs = records(4)
    recs[0].domain = "algebra"  # a domain the training data does not have is fine
    write_jsonl(recs, cfg.data.eval_file)
    ex, st = load_eval_examples(cfg, scorer.tokenizer, domain_table(["geometry"]))
    assert [e.id for e in ex] == [r.id for r in recs] and st.n_kept == 4
    cfg.data.max_length = max(len(e.input_ids) for e in ex) - 1  # cut at a step boundary like training data
    ex, st = load_eval_examples(cfg, scorer.tokenizer, domain_table([]))
    assert st.n_kept == 4 and st.n_truncated == 1
    cfg.data.max_length = 5
    with pytest.raises(DataError, match="no example fits"):
        load_eval_examples(cfg, scorer.tokenizer, domain_table([]))
    write_jsonl([Record(id="u", question="q", steps=["s"], labels=[None], outcome=1.0)], cfg.data.eval_file)
    with pytest.raises(DataError, match="no record has step labels"):
        load_eval_examples(cfg, scorer.tokenizer, domain_table([]))
