"""dreamprm/state.py: the TrainState a checkpoint holds whole, and how an update is folded into it."""

import torch

from dreamprm.config import MetaConfig
from dreamprm.data.loader import BatchStream
from dreamprm.data.tokenize import Example
from dreamprm.state import TrainState
from dreamprm.weights import build_weight_module, build_weight_optimizer


def _examples(n):
    return [Example(input_ids=[1, 2, 3], tag_pos=[2], labels=[1.0], outcome=1.0, index=i, domain=1 + i % 2,
                    n_steps=1, n_kept=1, id=f"r{i}") for i in range(n)]


def _state(seed=0):
    torch.manual_seed(seed)
    ex = _examples(6)
    wmod = build_weight_module("instance_domain_table", [e.domain for e in ex], 3, 8)
    return TrainState.new(wmod, build_weight_optimizer(wmod, MetaConfig(), 2), BatchStream(ex, 2, 0, seed=3),
                          BatchStream(ex, 1, 0, seed=4), [0, 0, 0, 1, 1, 1], 2)


def _update(st, rows):
    recent = [{"batch": {"index": torch.tensor(rows)}, "weights": torch.tensor([0.5, 2.0]),
               "features": torch.tensor([[0.25], [1.0]])}]
    window = torch.zeros(2, 3, dtype=torch.float64)
    st.observe(recent, window)
    return window


def test_an_update_is_folded_into_the_totals_the_window_and_the_last_weights():
    st = _state()
    window = _update(st, [1, 4])
    assert window.tolist() == [[1.0, 0.25, 0.5], [1.0, 1.0, 2.0]]
    assert torch.equal(st.src_local, window)
    assert st.last_w.tolist() == [-1.0, 0.5, -1.0, -1.0, 2.0, -1.0]


def test_state_dict_round_trips_every_part_of_the_state():
    a = _state()
    next(a.train_stream), next(a.train_stream), next(a.meta_stream)
    _update(a, [0, 5])
    a.step = 7
    with torch.no_grad():
        next(a.wmod.parameters()).add_(0.3)
    shared, per_rank = a.state_dict()
    assert shared["source_totals"] == a.src_local.tolist()  # one process, one rank: base 0 + local
    b = _state(seed=1)
    b.load_state_dict(shared, per_rank, world_changed=False)
    assert b.step == 7 and torch.equal(b.last_w, a.last_w) and torch.equal(b.src_base, a.src_local)
    for p, q in zip(a.wmod.state_dict().values(), b.wmod.state_dict().values()):
        assert torch.equal(p, q)
    assert b.train_stream.state_dict() == a.train_stream.state_dict()
    assert b.meta_stream.state_dict() == a.meta_stream.state_dict()
    assert next(b.train_stream)["index"].tolist() == next(a.train_stream)["index"].tolist()


def test_a_checkpoint_without_last_weights_resumes_as_unseen():
    a = _state()
    _update(a, [2, 3])
    shared, per_rank = a.state_dict()
    del per_rank["last_w"]
    b = _state()
    b.load_state_dict(shared, per_rank, world_changed=False)
    assert b.last_w.tolist() == [-1.0] * 6


def test_a_stream_that_does_not_fit_the_data_is_a_checkpoint_error_naming_the_flag():
    import pytest

    from dreamprm.errors import CheckpointError
    a = _state()
    shared, per_rank = a.state_dict()
    for key, flag in (("train_stream", "--train_file"), ("meta_stream", "--meta_file")):
        bad = {**per_rank, key: {**per_rank[key], "n": 7}}
        with pytest.raises(CheckpointError, match=f"{flag}: .*n was 7 in the checkpoint but is 6 now.*same data"):
            _state().load_state_dict(shared, bad, world_changed=False)
