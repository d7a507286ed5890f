import torch

from dreamprm.weights import DomainTable, InstanceNet, InstanceTable, RowAdam, build_weight_optimizer


def test_tables_start_neutral_and_normalise_to_mean_one():
    t = InstanceTable(10)
    w = t(torch.arange(10), None, None)
    torch.testing.assert_close(w, torch.ones(10))
    with torch.no_grad():
        t.raw[3] += 2.0
    assert abs(t.all_weights().mean().item() - 1.0) < 1e-6
    assert (t(torch.arange(10), None, None) >= 0).all()
    d = DomainTable(3)
    torch.testing.assert_close(d(None, torch.tensor([0, 2, 2]), None), torch.ones(3))


def test_hypergradient_reaches_only_batch_rows_and_rowadam_leaves_others():
    t = InstanceTable(6)
    opt = RowAdam(t.parameters(), lr=0.1)
    before = t.raw.detach().clone()
    for rows in ([1, 2], [2, 4]):
        opt.zero_grad()
        (-(t(torch.tensor(rows), None, None) * torch.tensor([1.0, -1.0])).sum()).backward()
        nz = set(torch.nonzero(t.raw.grad).flatten().tolist())
        assert nz == set(rows)  # the detached level sends nothing to other rows
        opt.step()
    moved = set(torch.nonzero(t.raw.detach() != before).flatten().tolist())
    assert moved == {1, 2, 4}
    # plain Adam would keep moving row 1 by momentum on the second step; RowAdam does not
    assert opt.state[t.raw]["step"].tolist() == [0, 1, 2, 0, 1, 0]


def test_instance_net_reads_features_and_level():
    net = InstanceNet(n_domains=2, hidden=8)
    f = torch.randn(4, 6)
    w = net(None, torch.tensor([0, 1, 0, 1]), f)
    torch.testing.assert_close(w, torch.ones(4))  # zero-initialised last layer: weight 1
    net.observe(torch.tensor(2.0))
    assert abs(net.level.item() - 1.1) < 1e-6
    opt = build_weight_optimizer(net, 0.01)
    assert isinstance(opt, torch.optim.Adam)
    (-(net(None, torch.tensor([0, 1, 0, 1]), f) * torch.tensor([1.0, 2.0, -1.0, 0.5])).sum()).backward()
    assert net.mlp[2].weight.grad.abs().sum() > 0
