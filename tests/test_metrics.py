import math

import numpy as np
import pytest

from dreamprm import metrics as M


def test_processbench_hand_example():
    samples = [  # (first-error label, step scores, predicted first error)
        (-1, [0.9, 0.8, 0.7], -1),       # correct, predicted correct
        (-1, [0.9, 0.3, 0.8], 1),        # correct, predicted wrong
        (-1, [0.5, 0.5], -1),            # score == threshold counts as correct
        (0, [0.2, 0.9], 0),              # error at step 0, found
        (2, [0.9, 0.6, 0.1, 0.0], 2),    # found
        (2, [0.9, 0.4, 0.1], 1),         # flagged too early
        (1, [0.5, 0.5, 0.9], -1),        # ties at the threshold: no error predicted
    ]
    for _label, scores, pred in samples:
        assert M.predicted_first_error(scores, 0.5) == pred
    r = M.processbench([s[0] for s in samples], [s[1] for s in samples], threshold=0.5)
    assert r["n_erroneous"] == 4 and r["n_correct"] == 3
    assert r["acc_erroneous"] == pytest.approx(2 / 4)
    assert r["acc_correct"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 7)  # 2ab/(a+b) with a=1/2, b=2/3


def test_processbench_threshold_tie_moves_with_threshold():
    # At threshold 0.6 the 0.6 step is still correct; at 0.61 it is the first error.
    assert M.processbench([2], [[0.9, 0.6, 0.1]], threshold=0.6)["acc_erroneous"] == 1.0
    assert M.processbench([2], [[0.9, 0.6, 0.1]], threshold=0.61)["acc_erroneous"] == 0.0


def test_processbench_edge_cases():
    none_err = M.processbench([-1, -1], [[0.9], [0.1, 0.9]])
    assert math.isnan(none_err["acc_erroneous"]) and none_err["acc_correct"] == 0.5
    assert math.isnan(none_err["f1"])
    zero = M.processbench([0, -1], [[0.9], [0.1]])
    assert zero["acc_erroneous"] == 0 and zero["acc_correct"] == 0 and zero["f1"] == 0.0
    perfect = {"a": M.processbench([0, -1], [[0.1], [0.9]]), "b": M.processbench([1], [[0.7, 0.2]])}
    assert math.isnan(M.average_f1(perfect))  # split b has no correct samples
    perfect["b"] = M.processbench([1, -1], [[0.7, 0.2], [1.0, 1.0]])
    assert M.average_f1(perfect) == 1.0
    with pytest.raises(ValueError, match="outside"):
        M.processbench([3], [[0.9, 0.9]])


def test_first_error_index():
    assert M.first_error_index([1.0, 1.0, 0.0, None]) == 2
    assert M.first_error_index([1.0, 1.0]) == -1
    assert M.first_error_index([0.0]) == 0
    assert M.first_error_index([None, 0.3]) == 1


def _brute_auroc(s, y):
    pos = [a for a, b in zip(s, y) if b]
    neg = [a for a, b in zip(s, y) if not b]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60) * 0.5 + 0.3 * y, 1)  # rounding makes many ties
    assert M.auroc(s, y) == pytest.approx(_brute_auroc(s.tolist(), y.tolist()))


def test_auroc_extremes():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert M.auroc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert math.isnan(M.auroc([0.1, 0.9], [1, 1]))
    assert M.auroc([0.1, 0.9], [0.2, 0.7]) == 1.0  # soft labels binarized at 0.5


def test_f1_at_hand_example():
    s, y = [0.9, 0.4, 0.5, 0.1, 0.2], [1, 0, 0, 1, 0]
    # error predicted where s < 0.5: steps 1, 3, 4 (0.5 is a tie: correct); true errors: 1, 2, 4
    r = M.f1_at(s, y, 0.5)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(3 / 5)
    c = M.f1_at(s, y, 0.5, positive="correct")
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (1, 1, 1, 2)
    assert c["f1"] == pytest.approx(0.5)
    assert math.isnan(M.f1_at([0.9, 0.1], [1, 1])["f1"])  # no erroneous steps
    none_found = M.f1_at([0.9, 0.9], [1, 0])
    assert none_found["precision"] == 0.0 and none_found["recall"] == 0.0 and none_found["f1"] == 0.0
    with pytest.raises(ValueError):
        M.f1_at(s, y, positive="wrong")


def test_ece_hand_example():
    r = M.ece([0.05, 0.15, 0.95, 0.95, 1.0], [0, 1, 1, 0, 1], n_bins=10)
    # bin 0: |0 - .05|, bin 1: |1 - .15|, bin 9 (1.0 included): |2/3 - 2.9/3| = 0.3 for 3 samples
    assert r["ece"] == pytest.approx((0.05 + 0.85 + 3 * 0.3) / 5)
    counts = [b["count"] for b in r["bins"]]
    assert counts == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    assert r["bins"][9]["accuracy"] == pytest.approx(2 / 3)
    assert r["bins"][9]["mean_prob"] == pytest.approx(2.9 / 3)
    assert math.isnan(r["bins"][5]["mean_prob"])
    assert M.ece([0.0, 1.0], [0, 1], n_bins=2)["ece"] == 0.0
    assert math.isnan(M.ece([], [])["ece"])


def test_aggregations_hand_values():
    assert M.AGGREGATIONS == ("mean_logodds", "min", "prod", "mean", "last")
    p = [0.5, 0.8, 0.2]
    expected = {"mean_logodds": 0.5, "min": 0.2, "prod": 0.08, "mean": 0.5, "last": 0.2}
    for how, v in expected.items():
        assert M.aggregate(p, how) == pytest.approx(v)
    assert M.aggregate([0.9, 0.9], "mean_logodds") == pytest.approx(0.9)
    # logits ln(1/3) and ln(9): mean ln(3)/2
    assert M.aggregate([0.25, 0.9], "mean_logodds") == pytest.approx(1 / (1 + 1 / math.sqrt(3)))
    assert M.aggregate([0.0], "mean_logodds") == pytest.approx(1e-6)  # clipped, not -inf
    assert M.aggregate([0.0, 1.0], "mean_logodds") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        M.aggregate(p, "max")
    with pytest.raises(ValueError, match="empty"):
        M.aggregate([], "min")


def test_best_of_n_planted():
    groups = {
        "g1": [(0.9, 1, "5"), (0.2, 0, "6"), (0.1, 0, "6")],   # pick right; majority "6" wrong
        "g2": [(0.3, 0, "1"), (0.7, 0, "2"), (0.5, 1, "3")],   # pick wrong; 3-way tie -> "1" wrong
        "g3": [(0.4, 1, "a"), (0.4, 0, "b")],                  # score tie -> first (right); vote tie -> "a"
        "g4": [(0.8, 0, None), (0.1, 0, None)],                # nothing right, no answers
        "g5": [(0.5, 1, "x"), (0.6, 0, None), (0.2, 1, "x")],  # pick wrong; None does not vote
    }
    r = M.best_of_n(groups)
    assert r["selection"] == pytest.approx(2 / 5)
    assert r["random"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 0 + 2 / 3) / 5)
    assert r["pass_at_n"] == pytest.approx(4 / 5)
    assert r["majority"] == pytest.approx(2 / 5)
    assert r["n_groups"] == 5 and r["mean_n"] == pytest.approx(13 / 5)
    assert M.best_of_n({"g": [(0.1, True, None), (0.2, False, None)]})["majority"] is None
    with pytest.raises(ValueError, match="non-finite"):
        M.best_of_n({"g": [(math.nan, 1, None)]})
