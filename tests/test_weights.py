import pytest
import torch

from dreamprm.config import MetaConfig
from dreamprm.weights import InstanceNet, RowOptimizer, WeightTable, build_weight_module, build_weight_optimizer


def test_tables_start_neutral_and_normalise_to_mean_one_over_the_training_instances():
    t = build_weight_module("instance_table", [0] * 10, 1, 8)
    torch.testing.assert_close(t(torch.arange(10), None, None), torch.ones(10))
    with torch.no_grad():
        t.raw[3] += 2.0
    assert abs(t.instance_weights().mean().item() - 1.0) < 1e-6
    assert (t(torch.arange(10), None, None) >= 0).all()
    # domain table: 3 rows, row 0 read by no training instance (the meta records' domain)
    d = build_weight_module("domain_table", [1, 1, 1, 2], 3, 8)
    torch.testing.assert_close(d(None, torch.tensor([0, 2, 2]), None), torch.ones(3))
    with torch.no_grad():
        d.raw[0] += 5.0  # an unused row does not move the level
        d.raw[2] -= 1.0
    w = d.instance_weights()
    assert w.shape == (4,) and abs(w.mean().item() - 1.0) < 1e-6
    assert w[0] == w[1] == w[2] > 1.0 > w[3]
    torch.testing.assert_close(d.row_weights()[torch.tensor([1, 1, 1, 2])], w)


def test_hypergradient_reaches_only_batch_rows_and_no_optimizer_moves_others():
    for how in ("shared_rms", "row_adam", "sgd"):
        t = WeightTable(torch.arange(6), 6, by="index")
        opt = RowOptimizer(t.parameters(), lr=0.1, how=how)
        before = t.raw.detach().clone()
        for rows in ([1, 2], [2, 4]):
            opt.zero_grad()
            (-(t(torch.tensor(rows), None, None) * torch.tensor([1.0, -1.0])).sum()).backward()
            assert set(torch.nonzero(t.raw.grad).flatten().tolist()) == set(rows)  # detached level
            opt.step()
        assert set(torch.nonzero(t.raw.detach() != before).flatten().tolist()) == {1, 2, 4}, how


def test_shared_rms_steps_in_proportion_to_the_gradient_row_adam_by_its_sign():
    g = torch.tensor([1e-3, 4e-3, -2e-3, 0.0])
    steps = {}
    for how in ("shared_rms", "row_adam"):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = RowOptimizer([p], lr=0.1, how=how)
        p.grad = g.clone()
        opt.step()
        steps[how] = -p.detach()
    s = steps["shared_rms"]
    torch.testing.assert_close(s[:3] / s[0], g[:3] / g[0])  # proportional
    rms = (g[:3] ** 2).mean().sqrt()
    torch.testing.assert_close(s[:3], 0.1 * g[:3] / rms)  # the scale of g does not matter
    torch.testing.assert_close(steps["row_adam"][:3], 0.1 * g[:3].sign(), atol=1e-5, rtol=1e-4)
    assert s[3] == 0 and steps["row_adam"][3] == 0


def test_instance_net_reads_features_and_level():
    net = InstanceNet(n_domains=2, hidden=8)
    f = torch.randn(4, 6)
    w = net(None, torch.tensor([0, 1, 0, 1]), f)
    torch.testing.assert_close(w, torch.ones(4))  # zero-initialised last layer: weight 1
    net.observe(torch.tensor(2.0))
    assert abs(net.level.item() - 1.1) < 1e-6
    assert net.instance_weights() is None
    opt = build_weight_optimizer(net, MetaConfig(meta_lr=0.01))
    assert isinstance(opt, torch.optim.Adam)
    (-(net(None, torch.tensor([0, 1, 0, 1]), f) * torch.tensor([1.0, 2.0, -1.0, 0.5])).sum()).backward()
    assert net.mlp[2].weight.grad.abs().sum() > 0


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="table optimizer"):
        RowOptimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.1, how="adamw")
    with pytest.raises(ValueError, match="weight module"):
        build_weight_module("table", [0], 1, 8)


def test_instance_domain_table_multiplies_a_row_by_its_domain_factor():
    domains = [1, 1, 1, 2, 2, 2, 2, 2]  # domain 0 (the meta records') is read by no instance
    t = build_weight_module("instance_domain_table", domains, 3, 8)
    torch.testing.assert_close(t(torch.arange(8), torch.tensor(domains), None), torch.ones(8))
    with torch.no_grad():
        t.raw_domain[2] -= 1.0  # domain 2 down
        t.raw_domain[0] += 5.0  # unused: must not move the level
        t.raw[0] += 1.0  # one instance of domain 1 up
    w = t.instance_weights()
    assert abs(w.mean().item() - 1.0) < 1e-6
    assert w[0] > w[1] == w[2] > w[3] == w[7]
    torch.testing.assert_close(t(torch.arange(8), torch.tensor(domains), None), w)
    # a batch's hypergradient reaches its rows and its domains' factors only
    opt = build_weight_optimizer(t, MetaConfig(meta_lr=0.4), batch_global=2)
    opt.zero_grad()
    (-(t(torch.tensor([1, 4]), torch.tensor([1, 2]), None) * torch.tensor([1.0, -2.0])).sum()).backward()
    assert set(torch.nonzero(t.raw.grad).flatten().tolist()) == {1, 4}
    assert set(torch.nonzero(t.raw_domain.grad).flatten().tolist()) == {1, 2}
    before = t.raw_domain.detach().clone()
    opt.step()
    assert t.raw_domain[1] > before[1] and t.raw_domain[2] < before[2] and t.raw_domain[0] == before[0]
    # the factor is visited every meta pass, a row batch / n of them: its rate is scaled to match
    assert [g["lr"] for g in opt.param_groups] == [0.4, pytest.approx(0.4 * 2 / 8)]


def test_fixed_weights_give_each_instance_its_given_weight_and_learn_nothing():
    from dreamprm.weights import FixedWeights

    given = [0.5, 2.0, 1.25, 0.0]
    mod = FixedWeights(given)
    idx = torch.tensor([3, 0, 2, 0])
    assert mod(idx, torch.zeros(4, dtype=torch.long), torch.zeros(4, 6)).tolist() == [0.0, 0.5, 1.25, 0.5]
    assert list(mod.parameters()) == [] and build_weight_optimizer(mod, MetaConfig()) is None
    assert mod.instance_weights().tolist() == given
    mod.observe(torch.tensor(7.0))  # no level to keep
    assert mod.instance_weights().tolist() == given
    assert mod.state_dict()["w"].tolist() == given  # a checkpoint holds them (resume compares)
