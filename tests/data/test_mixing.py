"""data/mixing.py: mixture probabilities, the curriculum, the resumable mixture sampler."""

import math

import numpy as np
import pytest

from dreamprm.data.mixing import Curriculum, MixtureStream, mixture_probs


def stream(sizes, probs, rank=0, world=1, batch_size=4, curriculum=None, difficulty=None, seed=3):
    source_of = [s for s, n in enumerate(sizes) for _ in range(n)]
    return MixtureStream(list(range(len(source_of))), source_of, batch_size, 0, probs, rank, world, seed,
                         curriculum, difficulty, collate_fn=lambda ex, pad: ex)


def test_mixture_probabilities():
    sizes = [100, 400, 0]
    np.testing.assert_allclose(mixture_probs(sizes, "size", 0.5, [1, 1, 1]), [0.2, 0.8, 0])
    np.testing.assert_allclose(mixture_probs(sizes, "temperature", 0.5, [1, 1, 1]), [1 / 3, 2 / 3, 0])
    np.testing.assert_allclose(mixture_probs(sizes, "temperature", 0.0, [1, 1, 1]), [0.5, 0.5, 0])
    np.testing.assert_allclose(mixture_probs(sizes, "weights", 0.5, [3, 1, 5]), [0.75, 0.25, 0])
    np.testing.assert_allclose(mixture_probs(sizes, "learned", 1.0, [1, 1, 1], [2.0, 0.5, 1.0]), [0.5, 0.5, 0])
    with pytest.raises(ValueError):
        mixture_probs(sizes, "weights", 0.5, [0, 0, 1])


def test_empirical_mixture_matches_the_requested_one():
    """4000 draws from 3 sources of different sizes: chi-square goodness of fit at the 0.1% level
    (critical value 13.82 for 2 degrees of freedom), and every share within 0.03 of its target."""
    p = np.array([0.6, 0.3, 0.1])
    s = stream([50, 500, 7], p, batch_size=8)
    counts = np.zeros(3)
    for _ in range(500):
        for i in s.next_indices():
            counts[0 if i < 50 else 1 if i < 550 else 2] += 1
    n = counts.sum()
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum()
    assert n == 4000 and chi2 < 13.82, (counts, chi2)
    assert np.abs(counts / n - p).max() < 0.03


def test_each_source_is_a_permutation_per_pass_and_ranks_are_disjoint():
    seen = {}
    for r in (0, 1):
        s = stream([10, 20], [0.5, 0.5], rank=r, world=2, batch_size=1)
        from_0 = [i for _ in range(60) for i in s.next_indices() if i < 10]
        seen[r] = from_0[:5]  # rank r's slice of the first pass over source 0
        assert sorted(from_0[5:10]) != from_0[5:10] or sorted(from_0[:5]) != from_0[:5]  # shuffled
    assert sorted(seen[0] + seen[1]) == list(range(10))  # 5 each, no overlap: a pass covers the source once


def test_curriculum_starts_with_the_easiest_and_grows_to_all():
    cur = Curriculum(start=0.2, ramp_batches=50)
    assert cur.fraction(0) == pytest.approx(0.2) and cur.fraction(25) == pytest.approx(0.6)
    assert cur.fraction(50) == cur.fraction(500) == 1.0
    assert Curriculum(0.2, 50, "sqrt").fraction(25) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    difficulty = [float(100 - i) for i in range(100)]  # the last example is the easiest
    s = stream([100], [1.0], batch_size=2, curriculum=cur, difficulty=difficulty)
    first = [i for _ in range(5) for i in s.next_indices()]
    assert all(i >= 80 for i in first)  # the easiest 20%
    late = {i for _ in range(500) for i in s.next_indices()}
    assert min(late) < 10  # the hardest are reached once the pool is the whole source


def test_state_dict_resumes_exactly_mid_pass_with_curriculum_and_new_probs():
    kw = dict(world=2, rank=1, batch_size=3, curriculum=Curriculum(0.3, 20, "sqrt"),
              difficulty=[float(i % 7) for i in range(60)])
    a = stream([25, 35], [0.7, 0.3], **kw)
    for _ in range(9):
        a.next_indices()
    a.set_probs([0.2, 0.8])  # e.g. learned weights after a meta pass
    state = a.state_dict()
    want = [a.next_indices() for _ in range(30)]
    b = stream([25, 35], [0.5, 0.5], **kw)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(30)] == want
    for bad in ({**state, "seed": 4}, {**state, "world": 1}, {**state, "sizes": [25, 36]}):
        with pytest.raises(ValueError, match="in the checkpoint"):
            stream([25, 35], [0.5, 0.5], **kw).load_state_dict(bad)


def test_bad_streams_are_refused():
    with pytest.raises(ValueError, match="fewer examples than ranks"):
        stream([1, 5], [0.5, 0.5], world=2)
    with pytest.raises(ValueError, match="not a distribution"):
        stream([5, 5], [0.5, -0.5])


def test_a_training_file_of_unknown_format_names_the_training_flags_not_the_data_commands(tmp_path):
    from dreamprm.config import Source
    from dreamprm.data.mixing import read_sources

    f = tmp_path / "odd.jsonl"
    f.write_text('{"text": "hello"}\n')
    _, _, problems = read_sources([Source("--train_file", str(f), "odd", "auto", None)],
                                  [Source("--meta_file", str(f), "odd", "auto", None)], "<extra_0>", False)
    assert len(problems) == 2 and not any("--from" in p for p in problems)
    assert "pass --train_format (or format=F in the --train_file spec) one of dreamprm, " in problems[0]
    assert "pass --meta_format (or format=F in the --meta_file spec) one of" in problems[1]
