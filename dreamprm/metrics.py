"""Evaluation metrics for process reward models (plain python / numpy).

Conventions shared by every function here:
- A score is the PRM's probability that a step is correct, in [0, 1].
- A label is a probability that the step is correct; soft labels are binarized at 0.5
  where a metric needs classes ("correct" = label >= 0.5).
- A step is predicted erroneous when its score is strictly below the threshold; a score
  equal to the threshold counts as correct. ProcessBench (Zheng et al., 2024) and F1 use
  this same rule, so the two agree on every step.
- A metric that has no samples to be computed on is nan (None in the JSON report), never 0.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

# Solution-level aggregations of step scores. The training meta loss (hypergrad.py) uses
# the same names for its torch versions; keep the two lists identical.
from dreamprm.config import AGGREGATIONS
_EPS = 1e-6


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not (np.isfinite(s).all() and np.isfinite(y).all()):
        raise ValueError("scores and labels must be finite numbers")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve for "label is correct" (label >= 0.5) against the score.

    Mann-Whitney U with average ranks, so tied scores count one half per pair.
    nan when either class is empty.
    """
    s, y = _arrays(scores, labels)
    pos = y >= 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    # Average rank (1-based) over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[pos].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def f1_at(scores, labels, threshold: float = 0.5, positive: str = "error") -> dict:
    """Precision, recall, F1 and accuracy of thresholded step scores.

    positive="error" (default) makes the erroneous step the positive class, which is what a
    PRM is asked to find: predicted positive = score < threshold, actual = label < 0.5.
    positive="correct" flips both (score >= threshold, label >= 0.5).
    Precision is 0 when nothing is predicted positive; recall and F1 are nan when no
    sample is actually positive.
    """
    if positive not in ("error", "correct"):
        raise ValueError(f"positive must be 'error' or 'correct', got {positive!r}")
    s, y = _arrays(scores, labels)
    pred_err, true_err = s < threshold, y < 0.5
    pred, true = (pred_err, true_err) if positive == "error" else (~pred_err, ~true_err)
    tp, fp = int((pred & true).sum()), int((pred & ~true).sum())
    fn, tn = int((~pred & true).sum()), int((~pred & ~true).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(s)
    return {"positive": positive, "threshold": threshold, "precision": precision, "recall": recall,
            "f1": f1, "accuracy": (tp + tn) / n if n else math.nan,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": n}


def ece(probs, labels, n_bins: int = 10) -> dict:
    """Expected calibration error over equal-width bins, plus the reliability-diagram data.

    Bin k holds probabilities in [k/n, (k+1)/n); 1.0 falls in the last bin. A bin's
    "accuracy" is the mean label, so soft labels are compared as they are. Empty bins have
    count 0 and nan mean_prob / accuracy; ece is nan when there are no samples.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _arrays(probs, labels)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins, total = [], 0.0
    for k in range(n_bins):
        m = idx == k
        c = int(m.sum())
        conf = float(p[m].mean()) if c else math.nan
        acc = float(y[m].mean()) if c else math.nan
        if c:
            total += c * abs(acc - conf)
        bins.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "count": c,
                     "mean_prob": conf, "accuracy": acc})
    return {"ece": total / len(p) if len(p) else math.nan, "n_bins": n_bins, "bins": bins}


def first_error_index(labels) -> int:
    """Index of the first step labelled wrong (label < 0.5), -1 when there is none."""
    for k, y in enumerate(labels):
        if y is not None and y < 0.5:
            return k
    return -1


def predicted_first_error(scores, threshold: float = 0.5) -> int:
    """Index of the first step scored strictly below threshold, -1 when there is none."""
    for k, p in enumerate(scores):
        if p < threshold:
            return k
    return -1


def processbench(first_error_labels, step_scores_list, threshold: float = 0.5) -> dict:
    """The ProcessBench metric for one split.

    acc_erroneous: fraction of samples with an error (label != -1) whose predicted first
    error equals the label; acc_correct: fraction of error-free samples (label == -1)
    predicted -1; f1 is their harmonic mean (0 when both are 0). When a split has no
    samples of one kind, that accuracy and f1 are nan: the paper's F1 is undefined there.
    """
    if len(first_error_labels) != len(step_scores_list):
        raise ValueError(f"{len(first_error_labels)} labels for {len(step_scores_list)} score lists")
    hits_err, hits_ok, n_err, n_ok = 0, 0, 0, 0
    for i, (label, scores) in enumerate(zip(first_error_labels, step_scores_list)):
        if not -1 <= label < len(scores):
            raise ValueError(f"sample {i}: first-error label {label} outside [-1, {len(scores) - 1}]")
        pred = predicted_first_error(scores, threshold)
        if label == -1:
            n_ok += 1
            hits_ok += pred == -1
        else:
            n_err += 1
            hits_err += pred == label
    a = hits_err / n_err if n_err else math.nan
    b = hits_ok / n_ok if n_ok else math.nan
    if math.isnan(a) or math.isnan(b):
        f1 = math.nan
    else:
        f1 = 2 * a * b / (a + b) if a + b else 0.0
    return {"acc_erroneous": a, "acc_correct": b, "f1": f1,
            "n_erroneous": n_err, "n_correct": n_ok, "threshold": threshold}


def average_f1(per_split: dict) -> float:
    """Unweighted mean of the split F1s, as the ProcessBench paper reports; nan if any is nan."""
    f1s = [r["f1"] for r in per_split.values()]
    return float(np.mean(f1s)) if f1s else math.nan


def aggregate(step_probs, how: str) -> float:
    """One solution score from its step scores; `how` is one of AGGREGATIONS.

    mean_logodds = sigmoid(mean(logit(p))) with p clipped to [1e-6, 1 - 1e-6], so a
    single 0 or 1 does not decide the result alone.
    """
    p = np.asarray(step_probs, dtype=float).reshape(-1)
    if p.size == 0:
        raise ValueError("cannot aggregate an empty list of step scores")
    if how == "mean_logodds":
        q = np.clip(p, _EPS, 1 - _EPS)
        z = float(np.mean(np.log(q) - np.log1p(-q)))
        return 1.0 / (1.0 + math.exp(-z))
    if how == "min":
        return float(p.min())
    if how == "prod":
        return float(np.prod(p))
    if how == "mean":
        return float(p.mean())
    if how == "last":
        return float(p[-1])
    raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")


def best_of_n(groups: dict) -> dict:
    """Best-of-N selection over groups of candidate solutions to the same problem.

    groups maps a group key to a list of (score, correct, answer-or-None) in file order;
    correct is a bool or an outcome in [0, 1] (>= 0.5 is correct).
    - selection: the candidate with the highest score is picked; ties go to the first
      candidate in file order. Accuracy = fraction of groups whose pick is correct.
    - random: mean over groups of the group's pass rate (expected accuracy of a random pick).
    - pass_at_n: fraction of groups with at least one correct candidate (the oracle).
    - majority: the most frequent answer is picked, ties to the answer seen first; candidates
      without an answer do not vote, and a group with no answers counts as wrong. The pick
      is correct when the first candidate giving that answer is correct. None when no
      candidate in any group has an answer.
    """
    if not groups:
        raise ValueError("best_of_n needs at least one group")
    sel, rnd, any_ok, maj, sizes, has_answers = [], [], [], [], [], False
    for key, cands in groups.items():
        if not cands:
            raise ValueError(f"group {key!r} has no candidates")
        scores = [float(c[0]) for c in cands]
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"group {key!r} has a non-finite score")
        ok = [float(c[1]) >= 0.5 for c in cands]
        best = max(range(len(cands)), key=lambda i: (scores[i], -i))
        sel.append(ok[best])
        rnd.append(sum(ok) / len(ok))
        any_ok.append(any(ok))
        sizes.append(len(cands))
        answers = [c[2] if len(c) > 2 else None for c in cands]
        votes = Counter(a for a in answers if a is not None)
        if votes:
            has_answers = True
            top = max(votes.values())
            winner = next(a for a in answers if a is not None and votes[a] == top)
            maj.append(ok[answers.index(winner)])
        else:
            maj.append(False)
    return {"selection": float(np.mean(sel)), "random": float(np.mean(rnd)),
            "pass_at_n": float(np.mean(any_ok)),
            "majority": float(np.mean(maj)) if has_answers else None,
            "n_groups": len(groups), "mean_n": float(np.mean(sizes))}
