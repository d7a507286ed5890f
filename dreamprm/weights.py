"""Weight modules: give each training instance a non-negative weight, mean 1.

They are small, replicated on every rank, and live outside the DeepSpeed engine. The
weight is softplus(raw) divided by a DETACHED reference level, so the loss scale stays put
while the hypergradient reaches only the rows or inputs of the current batch. Raw values
start where softplus gives 1.

Every weight module offers the same four calls, used by the engine and the loop:
  module(index, domain, features) -> [B] weights of a batch (differentiable in the module);
  module.positive(index, domain, features) -> [B] softplus values before the level;
  module.observe(global_mean) after each meta step, with the mean of positive() over the
      global batch (the net keeps its level as a running mean of it; tables ignore it);
  module.instance_weights() -> the current weight of every training instance, or None
      when a weight depends on features seen in training (the net).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dreamprm.config import TABLE_OPTIMIZERS

RAW_ONE = math.log(math.e - 1.0)  # softplus(RAW_ONE) == 1: "neutral" weight
N_FEATURES = 6  # see hypergrad.instance_features


class WeightTable(nn.Module):
    """One learned weight per row; instance i reads row rows_of[i].

    Instance table (DreamPRM-1.5): rows_of = 0..n-1, a row per instance, read by `index`.
    Domain table (DreamPRM): rows_of = the instances' domain ids, read by `domain`.
    Instance-domain table: an instance table whose weights are multiplied by a domain factor
    (domain_of given): instance i weighs softplus(raw[i]) * softplus(raw_domain[domain_of[i]]).
    A row of an instance table is visited once per epoch, so on its own it averages few, noisy
    alignments; the domain factor pools the alignments of every instance of the domain and moves
    at every meta pass, and the rows only learn how an instance differs from its domain.
    The level is the mean weight over the TRAINING INSTANCES (rows weighted by how many
    instances read them), so the weights average 1 over the training set and a row no
    training instance reads (the meta records' domain) does not count.
    """

    def __init__(self, rows_of: torch.Tensor, n_rows: int, by: str, domain_of: torch.Tensor | None = None,
                 n_domains: int = 0):
        super().__init__()
        if by not in ("index", "domain"):
            raise ValueError(f"a weight table is read by 'index' or 'domain', not {by!r}")
        self.by = by
        self.raw = nn.Parameter(torch.full((n_rows,), RAW_ONE))
        self.register_buffer("rows_of", rows_of.long(), persistent=False)
        self.register_buffer("count", torch.bincount(self.rows_of, minlength=n_rows).float(), persistent=False)
        self.raw_domain = None
        if domain_of is not None:
            self.raw_domain = nn.Parameter(torch.full((n_domains,), RAW_ONE))
            self.register_buffer("domain_of", domain_of.long(), persistent=False)

    def _all(self) -> torch.Tensor:
        """softplus values of every training instance, detached."""
        w = F.softplus(self.raw.detach())[self.rows_of]
        if self.raw_domain is not None:
            w = w * F.softplus(self.raw_domain.detach())[self.domain_of]
        return w

    def _level(self) -> torch.Tensor:
        if self.raw_domain is not None:
            return self._all().mean()
        return (F.softplus(self.raw.detach()) * self.count).sum() / self.count.sum()

    def positive(self, index, domain, features):
        w = F.softplus(self.raw[index if self.by == "index" else domain])
        if self.raw_domain is not None:
            w = w * F.softplus(self.raw_domain[domain])
        return w

    def forward(self, index, domain, features):
        return self.positive(index, domain, features) / self._level()

    def observe(self, global_mean: torch.Tensor) -> None:
        """Nothing to do: a table's level is its own mean."""

    def instance_weights(self) -> torch.Tensor:
        return self._all() / self._level()

    def row_weights(self) -> torch.Tensor:
        """The weight of every row (for the domain table: per domain), same level."""
        return F.softplus(self.raw.detach()) / self._level()


class InstanceNet(nn.Module):
    """A small MLP over detached per-instance features and a domain embedding.

    The reference level is a running mean of the net's raw output over global batches; the
    engine feeds it the all-reduced batch mean via observe() so every rank holds the same.
    """

    def __init__(self, n_domains: int, hidden: int = 32, momentum: float = 0.9):
        super().__init__()
        self.domain_emb = nn.Embedding(n_domains, 4)
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES + 4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, RAW_ONE)  # every instance starts at weight 1
        self.momentum = momentum
        self.register_buffer("level", torch.ones(()))

    def positive(self, index, domain, features):
        x = torch.cat([features, self.domain_emb(domain)], dim=-1)
        return F.softplus(self.mlp(x).squeeze(-1))

    def forward(self, index, domain, features):
        return self.positive(index, domain, features) / self.level

    @torch.no_grad()
    def observe(self, global_mean: torch.Tensor) -> None:
        self.level.mul_(self.momentum).add_((1 - self.momentum) * global_mean)

    def instance_weights(self) -> None:
        return None  # depends on features: the loop records the weight each instance was trained with


class FixedWeights(nn.Module):
    """Weights given, not learned (--weights_from): instance i weighs w[i]. Nothing to train, so no optimizer and no
    meta pass; w is a buffer, so a checkpoint holds the weights the run trained with (resume compares them)."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32).clone())

    def positive(self, index, domain, features):
        return self.w[index.cpu()].to(index.device)

    def forward(self, index, domain, features):
        return self.positive(index, domain, features)

    def observe(self, global_mean: torch.Tensor) -> None:
        """Nothing to do: the weights are fixed."""

    def instance_weights(self) -> torch.Tensor:
        return self.w.clone()


def build_weight_module(kind: str, train_domains, n_domains: int, hidden: int) -> nn.Module:
    """train_domains: the domain id of every training instance, in index order."""
    domains = torch.as_tensor(list(train_domains), dtype=torch.long)
    if kind == "instance_table":
        return WeightTable(torch.arange(len(domains)), len(domains), by="index")
    if kind == "domain_table":
        return WeightTable(domains, n_domains, by="domain")
    if kind == "instance_domain_table":
        return WeightTable(torch.arange(len(domains)), len(domains), by="index", domain_of=domains,
                           n_domains=n_domains)
    if kind == "instance_net":
        return InstanceNet(n_domains, hidden)
    raise ValueError(f"unknown weight module {kind!r}")


class RowOptimizer(torch.optim.Optimizer):
    """Updates only the table rows whose gradient is non-zero (the rows of the meta batch).

    Plain Adam's momentum (and AdamW's decay toward 0) would keep moving every other row.
      shared_rms: step = lr * g_row / sqrt(v), v one running mean of g^2 over all updated
                  rows (bias-corrected), so a row moves in proportion to its alignment and
                  the scale of the hypergradient does not matter;
      row_adam:   lazy Adam per row (SparseAdam-like): a row's first step is lr * sign(g)
                  whatever the size of its alignment, later ones about that size;
      sgd:        step = lr * g (proportional, but lr must match the hypergradient's scale).
    """

    def __init__(self, params, lr: float, how: str = "shared_rms", betas=(0.9, 0.999), eps=1e-8):
        if how not in TABLE_OPTIMIZERS:
            raise ValueError(f"unknown table optimizer {how!r} (choose from {', '.join(TABLE_OPTIMIZERS)})")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "how": how})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, how = group["lr"], group["how"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                hit = g != 0
                if not hit.any():
                    continue
                st = self.state[p]
                if how == "sgd":
                    p[hit] -= lr * g[hit]
                elif how == "shared_rms":
                    if not st:
                        st["step"] = torch.zeros(())
                        st["sq"] = torch.zeros(())
                    st["step"] += 1
                    st["sq"].mul_(b2).add_((1 - b2) * (g[hit] ** 2).mean())
                    v_hat = st["sq"] / (1 - b2 ** st["step"])
                    p[hit] -= lr * g[hit] / (v_hat.sqrt() + group["eps"])
                else:  # row_adam
                    if not st:
                        st["step"] = torch.zeros_like(p)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    st["step"][hit] += 1
                    st["exp_avg"][hit] = b1 * st["exp_avg"][hit] + (1 - b1) * g[hit]
                    st["exp_avg_sq"][hit] = b2 * st["exp_avg_sq"][hit] + (1 - b2) * g[hit] ** 2
                    t = st["step"][hit]
                    m_hat = st["exp_avg"][hit] / (1 - b1 ** t)
                    v_hat = st["exp_avg_sq"][hit] / (1 - b2 ** t)
                    p[hit] -= lr * m_hat / (v_hat.sqrt() + group["eps"])


def build_weight_optimizer(module: nn.Module, meta, batch_global: int = 1) -> torch.optim.Optimizer | None:
    """meta: the run's MetaConfig. Adam for the net; a RowOptimizer for the tables; None for fixed weights.

    batch_global: training instances per meta pass (all ranks, all micro-batches). An
    instance-domain table's domain factor is visited at every meta pass, an instance row about
    batch_global / n times per pass, so the factor's learning rate is meta_lr * batch_global / n:
    over an epoch it moves as far as a row does."""
    if isinstance(module, FixedWeights):
        return None
    if isinstance(module, InstanceNet):
        return torch.optim.Adam(module.parameters(), lr=meta.meta_lr)
    groups = [{"params": [module.raw]}]
    if module.raw_domain is not None:
        scale = min(1.0, batch_global / max(1, len(module.rows_of)))
        groups.append({"params": [module.raw_domain], "lr": meta.meta_lr * scale})
    return RowOptimizer(groups, lr=meta.meta_lr, how=meta.table_optimizer)
