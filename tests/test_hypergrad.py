import math

import pytest
import torch

from dreamprm import hypergrad
from dreamprm.config import AGGREGATIONS


def batch_of(labels, mask, outcome=None):
    labels = torch.tensor(labels, dtype=torch.float32)
    mask = torch.tensor(mask)
    return {"labels": torch.where(mask, labels, 0.0), "label_mask": mask, "step_mask": mask.clone(),
            "outcome": torch.tensor(outcome if outcome is not None else [math.nan] * len(labels))}


def test_instance_loss_is_soft_cross_entropy_over_labelled_steps():
    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [5.0, 5.0]]])
    b = batch_of([[0.8, 0.0, 1.0]], [[True, True, False]])
    p = torch.softmax(logits, -1)[..., 1]
    want = (-(0.8 * p[0, 0].log() + 0.2 * (1 - p[0, 0]).log()) - (1 - p[0, 1]).log()) / 2
    torch.testing.assert_close(hypergrad.instance_losses(logits, b), want.reshape(1))


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregations_match_hand_values(how):
    p = torch.tensor([0.9, 0.6, 0.8])
    z = torch.log(p / (1 - p))
    logits = torch.stack([torch.zeros(3), z], -1)[None]
    logits = torch.cat([logits, torch.zeros(1, 1, 2)], 1)  # a padded 4th step
    mask = torch.tensor([[True, True, True, False]])
    want = {"mean_logodds": torch.sigmoid(z.mean()), "min": p.min(), "prod": p.prod(), "mean": p.mean(),
            "last": p[-1]}[how]
    torch.testing.assert_close(hypergrad.aggregate(logits, mask, how)[0], want, atol=1e-6, rtol=1e-6)


def test_meta_loss_bce_and_mse():
    logits = torch.randn(3, 4, 2)
    b = batch_of([[1.0] * 4] * 3, [[True] * 4, [True, True, False, False], [True] * 4], [1.0, 0.0, 1.0])
    for how in AGGREGATIONS:
        s = hypergrad.aggregate(logits, b["step_mask"], how)
        bce = torch.nn.functional.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), b["outcome"])
        torch.testing.assert_close(hypergrad.meta_loss(logits, b, how, "bce"), bce, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hypergrad.meta_loss(logits, b, how, "mse"), ((s - b["outcome"]) ** 2).mean())


def test_finite_difference_alignment_matches_exact_on_a_small_function():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(3, 5, dtype=torch.float64)

    def loss_i(th):
        return torch.log1p(torch.exp(xs @ th))

    v = torch.randn(5, dtype=torch.float64)
    exact = torch.stack([torch.autograd.grad(loss_i(theta)[i], theta)[0] @ v for i in range(3)])
    eps = hypergrad.fd_epsilon(1e-3, v.norm().item())
    with torch.no_grad():
        fd = hypergrad.fd_alignments(loss_i(theta + eps * v), loss_i(theta - eps * v), 2 * eps)
    torch.testing.assert_close(fd.double(), exact, atol=1e-5, rtol=1e-4)
    assert hypergrad.fd_epsilon(0.01, 0.0) == 0.0


def test_dividing_by_the_perturbation_that_landed_undoes_bf16_shrinkage():
    """Parameters stored in bf16: theta +- eps v rounds back to theta wherever eps v_j is under
    half an ulp, so the step that lands is shorter than 2 eps along v. Losses whose gradient is
    along v see exactly that component: dividing by it (not by 2 eps) gives the alignment."""
    torch.manual_seed(0)
    n = 4000
    theta = (0.1 * torch.randn(n, dtype=torch.float64)).bfloat16()
    v = torch.randn(n, dtype=torch.float64) * 1e-3
    u = v / v.norm()
    scale = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)

    def loss_i(th):
        return torch.nn.functional.softplus(scale * (u @ th.double()))

    th = theta.double().requires_grad_(True)
    exact = torch.stack([torch.autograd.grad(loss_i(th)[i], th)[0] @ v for i in range(3)])
    eps = hypergrad.fd_epsilon(0.01, v.norm().item())
    plus, minus = (theta.double() + eps * v).bfloat16(), (theta.double() - eps * v).bfloat16()
    span = ((plus.double() - minus.double()) @ v).item() / v.norm().item() ** 2
    assert span / (2 * eps) < 0.9  # rounding really shortened the step
    nominal = hypergrad.fd_alignments(loss_i(plus), loss_i(minus), 2 * eps).double()
    landed = hypergrad.fd_alignments(loss_i(plus), loss_i(minus), span).double()
    torch.testing.assert_close(landed, exact, rtol=1e-3, atol=0)
    assert ((nominal - exact).abs() / exact.abs()).min() > 0.1


def test_weight_objective_gradient_is_minus_alignment_over_n():
    w = torch.ones(3, requires_grad=True)
    a = torch.tensor([1.0, -2.0, 0.5])
    hypergrad.weight_objective(w, a, n_global=6).backward()
    torch.testing.assert_close(w.grad, -a / 6)


def test_features_are_detached():
    logits = torch.randn(2, 3, 2, requires_grad=True)
    b = batch_of([[1.0, 0.0, 1.0]] * 2, [[True, True, True], [True, False, False]])
    f = hypergrad.instance_features(logits, b, hypergrad.instance_losses(logits, b))
    assert f.shape == (2, 6) and not f.requires_grad


def test_step_loss_variants_match_hand_values():
    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.3, 0.1]]])
    b = batch_of([[0.8, 0.0, 1.0]], [[True, True, True]])
    p = torch.softmax(logits, -1)[0, :, 1]
    y = torch.tensor([0.8, 0.0, 1.0])
    pos, neg = -y * p.log(), -(1 - y) * (1 - p).log()
    loss = hypergrad.instance_losses
    torch.testing.assert_close(loss(logits, b, hypergrad.StepLoss("ce")), (pos + neg).mean().reshape(1))
    bal = hypergrad.StepLoss("balanced_ce", pos_fraction=0.8)  # positives weighted 0.625, negatives 2.5
    torch.testing.assert_close(loss(logits, b, bal), (0.625 * pos + 2.5 * neg).mean().reshape(1))
    focal = hypergrad.StepLoss("focal", gamma=2.0)
    torch.testing.assert_close(loss(logits, b, focal), ((1 - p) ** 2 * pos + p ** 2 * neg).mean().reshape(1))
    yh = torch.tensor([1.0, 0.0, 1.0])  # 0.8 rounds to 1
    hard = -(yh * p.log() + (1 - yh) * (1 - p).log()).mean()
    torch.testing.assert_close(loss(logits, b, hypergrad.StepLoss("ce", hard=True)), hard.reshape(1))
    with pytest.raises(ValueError, match="unknown step loss"):
        loss(logits, b, hypergrad.StepLoss("hinge"))


def test_balanced_ce_gives_each_class_half_the_loss_on_data_with_that_positive_fraction():
    """With pos_fraction = the data's positive share and equal per-step CE, positives and negatives
    contribute equally (the class balance the option promises)."""
    y = torch.tensor([[1.0] * 8 + [0.0] * 2])  # 80% positive
    logits = torch.zeros(1, 10, 2)  # p = 0.5 everywhere: every step's CE is log 2
    mask = torch.ones(1, 10, dtype=torch.bool)
    spec = hypergrad.StepLoss("balanced_ce", pos_fraction=0.8)
    only_pos = hypergrad.instance_losses(logits, batch_of(y.tolist(), (mask & (y > 0.5)).tolist()), spec) * 8
    only_neg = hypergrad.instance_losses(logits, batch_of(y.tolist(), (mask & (y < 0.5)).tolist()), spec) * 2
    torch.testing.assert_close(only_pos, only_neg)
