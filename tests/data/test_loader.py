import math

import pytest
import torch

from dreamprm.data.loader import BatchStream, batches_per_epoch, collate
from dreamprm.config import DEFAULT_STEP_TAG as TAG
from dreamprm.data.record import Record
from dreamprm.data.tokenize import Example, encode_records

PAD = 0


def ex(i, length=5, n_kept=2, labels=None, outcome=math.nan):
    pos = list(range(length - n_kept, length))
    return Example([7] * length, pos, labels or [1.0] * n_kept, outcome, i, i % 3, n_kept, n_kept, f"r{i}")


def test_collate_shapes_dtypes_and_masks():
    b = collate([ex(0, 6, 3, [1.0, math.nan, 0.25], 1.0), ex(1, 4, 1, [0.0])], PAD)
    assert b["input_ids"].shape == (2, 6) and b["tag_pos"].shape == (2, 3)
    for k, dt in [("input_ids", torch.long), ("attention_mask", torch.long), ("tag_pos", torch.long),
                  ("step_mask", torch.bool), ("label_mask", torch.bool), ("labels", torch.float32),
                  ("outcome", torch.float32), ("index", torch.long), ("domain", torch.long)]:
        assert b[k].dtype == dt, k
    assert b["input_ids"][1].tolist() == [7, 7, 7, 7, PAD, PAD]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert b["tag_pos"].tolist() == [[3, 4, 5], [3, 0, 0]]
    assert b["step_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["label_mask"].tolist() == [[True, False, True], [True, False, False]]
    assert b["labels"].tolist() == [[1.0, 0.0, 0.25], [0.0, 0.0, 0.0]]
    assert b["outcome"][0] == 1.0 and torch.isnan(b["outcome"][1])
    assert b["index"].tolist() == [0, 1] and b["domain"].tolist() == [0, 1] and b["n_tokens"] == 10
    with pytest.raises(ValueError, match="pad"):
        collate([ex(0)], None)


def test_collate_real_tokenizer_unlabelled_steps_masked(bpe_tok, corpus):
    recs = [Record("a", corpus[0], corpus[1:4], [1.0, None, 0.0], outcome=None),
            Record("b", corpus[4], corpus[5:6], [None], outcome=0.0)]
    exs, _ = encode_records(recs, bpe_tok, TAG, 512, True)
    b = collate(exs, bpe_tok.pad_token_id)
    tid = bpe_tok.convert_tokens_to_ids(TAG)
    gathered = b["input_ids"].gather(1, b["tag_pos"])
    assert (gathered[b["step_mask"]] == tid).all()
    assert b["label_mask"].tolist() == [[True, False, True], [False, False, False]]
    assert torch.isnan(b["outcome"][0]) and b["outcome"][1] == 0.0


def indices(stream, n_batches):
    return [stream.__next__()["index"].tolist() for _ in range(n_batches)]


def test_ranks_disjoint_equal_and_cover_all_but_tail():
    exs = [ex(i) for i in range(10)]
    assert batches_per_epoch(10, 2, 3) == 2  # 3 samples per rank: batches of 2 and 1
    per_epoch = []
    for epoch in range(3):
        shards = []
        for r in range(3):
            s = BatchStream(exs, 2, PAD, rank=r, world=3, seed=5)
            s.load_state_dict({"epoch": epoch, "pos": 0, "n": 10, "world": 3, "seed": 5})
            got = indices(s, 2)
            assert [len(b) for b in got] == [2, 1]
            shards.append([i for b in got for i in b])
        flat = [i for sh in shards for i in sh]
        assert len(set(flat)) == 9  # disjoint, one sample (10 % 3) left out this epoch
        per_epoch.append(flat)
    assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch


def test_deterministic_and_seeded():
    exs = [ex(i) for i in range(9)]
    a, b, c = (BatchStream(exs, 4, PAD, seed=s) for s in (1, 1, 2))
    ia = indices(a, 6)
    assert ia == indices(b, 6) and ia != indices(c, 6)
    assert a.epoch == 1 and sorted(i for b in ia[:3] for i in b) == list(range(9))  # epoch 0 covers every sample
    assert indices(BatchStream(exs, 4, PAD, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 7])  # 3 batches per epoch per rank in both cases
def test_resume_mid_epoch_matches_uninterrupted(world, cut):
    exs = [ex(i) for i in range(11)]
    for rank in range(world):
        ref = indices(BatchStream(exs, 2 if world == 2 else 4, PAD, rank, world, seed=3), 12)
        s = BatchStream(exs, 2 if world == 2 else 4, PAD, rank, world, seed=3)
        indices(s, cut)
        state = s.state_dict()
        resumed = BatchStream(exs, 2 if world == 2 else 4, PAD, rank, world, seed=3)
        resumed.load_state_dict(state)
        assert indices(resumed, 12 - cut) == ref[cut:]


def test_load_state_dict_rejects_a_different_run():
    exs = [ex(i) for i in range(8)]
    s = BatchStream(exs, 2, PAD, world=2, seed=1)
    next(s)
    st = s.state_dict()
    assert st == {"epoch": 0, "pos": 2, "n": 8, "world": 2, "seed": 1}
    with pytest.raises(ValueError, match="n was 8.*seed was 1"):
        BatchStream(exs[:6], 2, PAD, seed=2).load_state_dict(st)
    with pytest.raises(ValueError, match="world was 2"):
        BatchStream(exs, 2, PAD, world=4).load_state_dict(st)
    t = BatchStream(exs, 2, PAD, world=4, seed=1)
    t.load_state_dict(st, allow_world_change=True)
    assert (t.epoch, t.pos) == (0, 1)


def test_stream_validates_arguments():
    with pytest.raises(ValueError, match="batch_size 0.*rank 2.*cannot give every one of 2"):
        BatchStream([ex(0)], 0, PAD, rank=2, world=2)


def test_worker_stream_matches_in_process_stream_and_resumes_exactly():
    from dreamprm.data.loader import WorkerStream, with_workers
    exs = [Example(input_ids=list(range(1, 3 + i % 5)), tag_pos=[1 + i % 5], labels=[1.0], outcome=float("nan"),
                   index=i, domain=0, n_steps=1, n_kept=1, id=str(i)) for i in range(11)]
    plain = BatchStream(exs, 3, pad_id=0, seed=5)
    assert with_workers(plain, 0) is plain
    workers = WorkerStream(BatchStream(exs, 3, pad_id=0, seed=5), num_workers=2)
    want = [next(plain) for _ in range(9)]
    got = []
    for _ in range(5):
        got.append(next(workers))
    state = workers.state_dict()  # workers have prefetched ahead; the state must not count that
    ref = BatchStream(exs, 3, pad_id=0, seed=5)
    for _ in range(5):
        next(ref)
    assert state == ref.state_dict()
    resumed = WorkerStream(BatchStream(exs, 3, pad_id=0, seed=5), num_workers=1)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(4)]
    for a, b in zip(want, got):
        assert a["index"].tolist() == b["index"].tolist()
        assert torch.equal(a["input_ids"], b["input_ids"])
