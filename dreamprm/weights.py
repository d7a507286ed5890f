"""Weight modules: give each training instance a non-negative weight, mean 1.

They are small, replicated on every rank, and live outside the DeepSpeed engine. The
weight is softplus(raw) divided by a DETACHED reference level (the table mean, or a
running mean for the net), so the loss scale stays put while the hypergradient reaches
only the rows or inputs of the current batch. Raw values start where softplus gives 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RAW_ONE = math.log(math.e - 1.0)  # softplus(RAW_ONE) == 1: "neutral" weight
N_FEATURES = 6  # see hypergrad.instance_features


class InstanceTable(nn.Module):
    """One weight per training instance (DreamPRM-1.5)."""

    def __init__(self, n_instances: int):
        super().__init__()
        self.raw = nn.Parameter(torch.full((n_instances,), RAW_ONE))

    def forward(self, index, domain, features):
        level = F.softplus(self.raw.detach()).mean()
        return F.softplus(self.raw[index]) / level

    def all_weights(self) -> torch.Tensor:
        w = F.softplus(self.raw.detach())
        return w / w.mean()


class DomainTable(nn.Module):
    """One weight per domain (DreamPRM): all instances of a domain share it."""

    def __init__(self, n_domains: int):
        super().__init__()
        self.raw = nn.Parameter(torch.full((n_domains,), RAW_ONE))

    def forward(self, index, domain, features):
        level = F.softplus(self.raw.detach()).mean()
        return F.softplus(self.raw[domain]) / level

    def all_weights(self) -> torch.Tensor:
        w = F.softplus(self.raw.detach())
        return w / w.mean()


class InstanceNet(nn.Module):
    """A small MLP over detached per-instance features and a domain embedding.

    The reference level is a running mean of the net's raw output over global batches; the
    loop feeds it the all-reduced batch mean via observe() so every rank holds the same.
    """

    def __init__(self, n_domains: int, hidden: int = 32, momentum: float = 0.9):
        super().__init__()
        self.domain_emb = nn.Embedding(n_domains, 4)
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES + 4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, RAW_ONE)  # every instance starts at weight 1
        self.momentum = momentum
        self.register_buffer("level", torch.ones(()))

    def positive(self, domain, features):
        x = torch.cat([features, self.domain_emb(domain)], dim=-1)
        return F.softplus(self.mlp(x).squeeze(-1))

    def forward(self, index, domain, features):
        return self.positive(domain, features) / self.level

    @torch.no_grad()
    def observe(self, global_mean: torch.Tensor) -> None:
        self.level.mul_(self.momentum).add_((1 - self.momentum) * global_mean)


def build_weight_module(kind: str, n_instances: int, n_domains: int, hidden: int) -> nn.Module:
    if kind == "instance_table":
        return InstanceTable(n_instances)
    if kind == "domain_table":
        return DomainTable(n_domains)
    if kind == "instance_net":
        return InstanceNet(n_domains, hidden)
    raise ValueError(f"unknown weight module {kind!r}")


class RowAdam(torch.optim.Optimizer):
    """Adam that updates only the entries whose gradient is non-zero (lazy, like SparseAdam).

    For weight tables: a meta step touches the rows of one batch; plain Adam's momentum (and
    AdamW's decay) would keep moving every other row, dragging unseen weights around.
    """

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros_like(p)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                hit = g != 0
                st["step"][hit] += 1
                st["exp_avg"][hit] = b1 * st["exp_avg"][hit] + (1 - b1) * g[hit]
                st["exp_avg_sq"][hit] = b2 * st["exp_avg_sq"][hit] + (1 - b2) * g[hit] ** 2
                t = st["step"][hit]
                m_hat = st["exp_avg"][hit] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"][hit] / (1 - b2 ** t)
                p[hit] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def build_weight_optimizer(module: nn.Module, lr: float) -> torch.optim.Optimizer:
    if isinstance(module, InstanceNet):
        return torch.optim.Adam(module.parameters(), lr=lr)
    return RowAdam(module.parameters(), lr=lr)
