"""PRM losses and the hypergradient of the instance weights, in plain torch.

Notation (see docs/ in README): l_i is the inner loss of training instance i, w_i its
weight, v the gradient of the meta loss w.r.t. the trainable PRM parameters theta (mean over
all ranks), and a_i = <grad_theta l_i, v> the alignment of instance i with the meta set.
The hypergradient we use is the implicit one with an identity inverse Hessian (as in
DreamPRM / Betty's darts), evaluated at the current parameters:

    d L_meta / d lambda  ~=  -(1 / B) * sum_i a_i * d w_i / d lambda

over the B instances of the last PRM update (all ranks). The inner learning rate is not
folded in: meta_lr absorbs it. The alignment methods compute the same a_i:
  exact:       <grad l_i, v> from per-sample hooks in one backward (persample.py);
  finite_diff: (l_i(theta + eps v) - l_i(theta - eps v)) / (2 eps), eps = R / ||v||, with 2 eps
               measured from the perturbation that landed (fd_alignments); sound only where
               the perturbed parameters are fp32 (the engine refuses it otherwise);
  fused:       the same hooks inside the PRM update's own backward.
Evaluation points: exact and finite_diff take v and grad l_i at theta_{t+1}, after the update
(DreamPRM / Betty's darts); fused takes both at theta_t, before it (v from a meta forward and
backward just before the update, grad l_i in train mode with the update's own dropout mask).
The one-step unrolled hypergradient pairs grad l_i(theta_t) with v(theta_{t+1}); each choice
differs from it by O(lr * ||Hessian||) terms, so all are first-order approximations of it.
Direction and scale are checked independently of these functions in tests/test_direction.py
(one-step unrolled hypergradient, lr -> 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreamprm.config import AGGREGATIONS, STEP_LOSSES



def step_logits(logits: torch.Tensor) -> torch.Tensor:
    """Log-odds of 'step correct' from the 2-class logits [B, K, 2] -> [B, K]."""
    return logits[..., 1] - logits[..., 0]


@dataclass(frozen=True)
class StepLoss:
    """The per-step loss of the inner objective (--step_loss, --hard_labels, --focal_gamma).

    ce: soft-label cross-entropy; balanced_ce: the same with positive steps weighted 0.5 / pos_fraction
    and negative ones 0.5 / (1 - pos_fraction), so both classes carry half the loss on the training
    data; focal: cross-entropy of each class scaled by (1 - p_class)^gamma (Lin et al. 2017), which
    shrinks the loss of steps already scored right. hard: labels rounded to 0/1 (threshold 0.5) first.
    """
    kind: str = "ce"
    hard: bool = False
    gamma: float = 2.0
    pos_fraction: float = 0.5


def instance_losses(logits: torch.Tensor, batch: dict, spec: StepLoss | None = None) -> torch.Tensor:
    """Per-instance inner loss [B]: mean over labelled steps of the step loss (StepLoss; default soft CE).

    log_softmax over the two logits (not BCE on probabilities) for stability. The inner update and
    both alignment methods call this with the same spec, so the hypergradient is that of the loss
    the PRM minimises.
    """
    spec = spec or StepLoss()
    logp = F.log_softmax(logits.float(), dim=-1)
    y = batch["labels"]
    if spec.hard:
        y = (y >= 0.5).float()
    pos, neg = -y * logp[..., 1], -(1 - y) * logp[..., 0]
    if spec.kind == "balanced_ce":
        pos, neg = pos * (0.5 / spec.pos_fraction), neg * (0.5 / (1 - spec.pos_fraction))
    elif spec.kind == "focal":
        p1 = logp[..., 1].exp()
        pos, neg = pos * (1 - p1) ** spec.gamma, neg * p1 ** spec.gamma
    elif spec.kind != "ce":
        raise ValueError(f"unknown step loss {spec.kind!r} (choose from {', '.join(STEP_LOSSES)})")
    m = batch["label_mask"].float()
    return ((pos + neg) * m).sum(-1) / m.sum(-1).clamp_min(1)


def aggregate(logits: torch.Tensor, step_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Solution score in (0, 1) [B] from the step logits of the real steps."""
    z = step_logits(logits.float())
    m = step_mask
    mf = m.float()
    n = mf.sum(-1).clamp_min(1)
    if how == "mean_logodds":
        return torch.sigmoid((z * mf).sum(-1) / n)
    logp = F.logsigmoid(z)
    if how == "prod":
        return torch.exp((logp * mf).sum(-1))
    p = torch.sigmoid(z)
    if how == "mean":
        return (p * mf).sum(-1) / n
    if how == "min":
        return p.masked_fill(~m, 2.0).min(-1).values.clamp_max(1.0)
    if how == "last":
        last = (m.long().cumsum(-1) * m.long()).argmax(-1)
        return p.gather(1, last[:, None]).squeeze(1)
    raise ValueError(f"unknown aggregation {how!r} (choose from {', '.join(AGGREGATIONS)})")


def meta_loss(logits: torch.Tensor, batch: dict, how: str, kind: str) -> torch.Tensor:
    """Mean over the meta batch of loss(aggregated score, outcome)."""
    z = batch["outcome"]
    if kind == "bce" and how == "mean_logodds":
        zl = step_logits(logits.float())
        mf = batch["step_mask"].float()
        mean_logodds = (zl * mf).sum(-1) / mf.sum(-1).clamp_min(1)
        return F.binary_cross_entropy_with_logits(mean_logodds, z)
    s = aggregate(logits, batch["step_mask"], how)
    if kind == "bce":
        s = s.clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(s, z)
    if kind == "mse":
        return F.mse_loss(s, z)
    raise ValueError(f"unknown meta loss {kind!r}")


@torch.no_grad()
def instance_features(logits: torch.Tensor, batch: dict, losses: torch.Tensor) -> torch.Tensor:
    """Detached per-instance features for the instance net [B, 6].

    loss, mean / min / last step probability, log(1 + steps), fraction of positive labels.
    Detached on purpose: a net that saw the graph could learn to lower its own weight.
    """
    m = batch["step_mask"]
    mf = m.float()
    n = mf.sum(-1).clamp_min(1)
    p = torch.sigmoid(step_logits(logits.float()))
    mean_p = (p * mf).sum(-1) / n
    min_p = p.masked_fill(~m, 2.0).min(-1).values.clamp_max(1.0)
    last = (m.long().cumsum(-1) * m.long()).argmax(-1)
    last_p = p.gather(1, last[:, None]).squeeze(1)
    lm = batch["label_mask"].float()
    pos = ((batch["labels"] >= 0.5).float() * lm).sum(-1) / lm.sum(-1).clamp_min(1)
    return torch.stack([losses.detach().float(), mean_p, min_p, last_p, torch.log1p(n), pos], -1)


def weight_objective(weights: torch.Tensor, alignments: torch.Tensor, n_global: int) -> torch.Tensor:
    """The surrogate whose gradient w.r.t. the weight module is the hypergradient.

    Sum over this rank's instances; summing the gradient over ranks gives the global one.
    """
    return -(weights * alignments.detach()).sum() / n_global


def fd_alignments(loss_plus: torch.Tensor, loss_minus: torch.Tensor, span: float) -> torch.Tensor:
    """(l_i(theta+) - l_i(theta-)) / span, span = <theta+ - theta-, v> / ||v||^2.

    span is the length, in units of v, of the perturbation that actually landed in the
    parameters (2 eps if nothing was rounded away), so rounding of theta +- eps v to the
    parameters' dtype shrinks the numerator and the denominator alike."""
    return ((loss_plus.double() - loss_minus.double()) / span).float()


def fd_epsilon(radius: float, v_norm: float) -> float:
    """eps = R / ||v|| (DreamPRM's choice): the perturbation has norm R whatever v's scale."""
    if not math.isfinite(v_norm) or v_norm == 0.0:
        return 0.0
    return radius / v_norm
