"""dreamprm.scoring on the tiny Qwen2 in one process: Scorer and loading errors.

The scores of a real 2-rank ZeRO-3 run, its export and its in-training evaluation are in test_export.py.
"""


import pytest
import torch

from dreamprm import metrics as M
from dreamprm.config import ModelConfig
from dreamprm.data.record import Record
from dreamprm.data.tokenize import encode_records, prompt_text
from dreamprm.model import build_prm, step_probs
from dreamprm.scoring import Scorer, ScoringError, load_scorer, path_kind

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
    with pytest.raises(ScoringError, match=r"up to the model's limit \(\d+\): `dreamprm evaluate --max-length N`, "
                       r"load_scorer\(\.\.\., max_length=N\)"):
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
