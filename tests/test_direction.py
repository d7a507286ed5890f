"""The bilevel meta step points where the bilevel objective says, checked independently.

Everything on the reference side is written here from the definitions, without
hypergrad.instance_losses / meta_loss / aggregate / weight_objective: a tiny fp64 PRM, the
soft-label cross-entropy, each aggregation, BCE / MSE, and the one-step unrolled
hypergradient

    d/d lambda  L_meta(theta - lr * grad_theta sum_i w_i(lambda) l_i(theta) / B)

by autograd through the inner step. As lr -> 0 it equals -lr/B sum_i <grad l_i, grad L_meta>
dw_i/dlambda, which is what bilevel.meta_update claims to follow (implicit hypergradient at
the current parameters, inner lr folded into meta_lr). The engine side is the real
bilevel.meta_update (exact and finite_diff) on a stand-in for the DeepSpeed engine (the accessors
bilevel.py reads) that runs the same tiny model in one process.

How the sign was checked: with `return +(weights * alignments.detach()).sum() / n_global` in
hypergrad.weight_objective, and tests/test_hypergrad.py (the test that restates the formula)
not run, `pytest tests/test_direction.py` fails all 68 cases: in the 60 direction cases the
cosine is negative (the assertion cos >= 0.999 fails), in the 8 "right way" cases the move
the engine chose raises the meta loss (checked 2026-11-30 with the four weight modules, then
the sign restored).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import kappa, rounding_shape
from torch import nn

from dreamprm import bilevel
from dreamprm.config import AGGREGATIONS, Config
from dreamprm.data.loader import collate
from dreamprm.hypergrad import StepLoss
from dreamprm.weights import build_weight_module, build_weight_optimizer

WEIGHTS = ("instance_table", "domain_table", "instance_net", "instance_domain_table")
N_TRAIN, N_DOMAINS, VOCAB = 12, 3, 23


class TinyPRM(nn.Module):
    """Embedding, causal running mean, one tanh layer, 2-class head at the step tags (fp64)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.score = nn.Linear(8, 2)  # the PRM layout: the head applied at the step tags is `score`

    def forward(self, input_ids, attention_mask, tag_pos):
        m = attention_mask[..., None].to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).cumsum(1) / m.cumsum(1).clamp_min(1)
        h = torch.tanh(self.mix(h))
        h = h.gather(1, tag_pos[..., None].expand(-1, -1, h.shape[-1]))
        return self.score(h)


def make_batch(gen, index, domain, n_steps, outcome=None):
    b, t, k = len(index), 10, max(n_steps)
    tag_pos = torch.zeros(b, k, dtype=torch.long)
    step_mask = torch.zeros(b, k, dtype=torch.bool)
    for i, n in enumerate(n_steps):
        tag_pos[i, :n] = torch.arange(n) * 3 + 2
        step_mask[i, :n] = True
    label_mask = step_mask & (torch.rand(b, k, generator=gen) < 0.85)
    label_mask[:, 0] = True
    labels = torch.where(label_mask, torch.rand(b, k, generator=gen), 0.0)
    return {"input_ids": torch.randint(0, VOCAB, (b, t), generator=gen),
            "attention_mask": torch.ones(b, t, dtype=torch.long),
            "tag_pos": tag_pos, "step_mask": step_mask, "label_mask": label_mask, "labels": labels,
            "outcome": torch.tensor(outcome if outcome is not None else [0.0] * b),
            "index": torch.tensor(index), "domain": torch.tensor(domain), "n_tokens": b * t,
            "ids": [f"r{i}" for i in index]}


def setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyPRM().double()
    # two micro-batches of one update (grad_accum 2); domain 0 is never a training domain
    recent = [make_batch(gen, [0, 5, 7], [1, 2, 1], [3, 2, 3]), make_batch(gen, [2, 9, 11], [2, 2, 1], [1, 3, 2])]
    recent = [{"batch": b, "features": torch.randn(3, 6, generator=gen)} for b in recent]
    meta = make_batch(gen, [0, 1, 2, 3, 4], [0] * 5, [3, 2, 3, 1, 2], outcome=[1.0, 0.0, 0.0, 1.0, 1.0])
    train_domains = [1, 2] * (N_TRAIN // 2)
    return model, recent, meta, train_domains


class StandInEngine:
    """What bilevel.meta_update reads from the engine (engine.core.Engine's accessors), for one process
    and ZeRO stage 0."""

    sharded, world, device, step_loss = False, 1, torch.device("cpu"), StepLoss()

    def __init__(self, model):
        self.module, self.params = model, [p for p in model.parameters() if p.requires_grad]

    def to_device(self, batch):
        return batch

    def forward(self, batch, meta=False):
        return self.module(batch["input_ids"], batch["attention_mask"], batch["tag_pos"])

    def local_tensor(self, p):
        return p.data

    def params_changed(self):
        pass

    def zero_grad(self):
        pass


# ---------------------------------------------------------------- the reference, from the definitions


def ref_instance_losses(logits, b):
    z = logits[..., 1] - logits[..., 0]  # log-odds of "correct"
    y, m = b["labels"].double(), b["label_mask"].double()
    ce = y * F.softplus(-z) + (1 - y) * F.softplus(z)  # -y log p - (1-y) log(1-p)
    return (ce * m).sum(-1) / m.sum(-1)


def ref_score(logits, step_mask, how):
    z = logits[..., 1] - logits[..., 0]
    p = torch.sigmoid(z)
    m = step_mask
    n = m.sum(-1)
    if how == "mean_logodds":
        return torch.sigmoid(torch.where(m, z, 0.0).sum(-1) / n)
    if how == "min":
        return torch.where(m, p, torch.inf).amin(-1)
    if how == "prod":
        return torch.where(m, p, 1.0).prod(-1)
    if how == "mean":
        return torch.where(m, p, 0.0).sum(-1) / n
    if how == "last":
        return p[torch.arange(len(p)), n - 1]
    raise AssertionError(how)


def ref_meta_loss(logits, b, how, kind):
    s, o = ref_score(logits, b["step_mask"], how), b["outcome"].double()
    if kind == "bce":
        return -(o * torch.log(s) + (1 - o) * torch.log(1 - s)).mean()
    return ((s - o) ** 2).mean()


def unrolled_hypergradient(model, wmod, recent, meta, how, kind, lr):
    """d L_meta(theta - lr * grad sum_i w_i l_i / B) / d lambda, in fp64."""
    wref = copy.deepcopy(wmod).double()
    names = [n for n, p in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def run(params, b):
        return torch.func.functional_call(model, dict(zip(names, params)),
                                          (b["input_ids"], b["attention_mask"], b["tag_pos"]))

    w = torch.cat([wref(r["batch"]["index"], r["batch"]["domain"], r["features"].double()) for r in recent])
    losses = torch.cat([ref_instance_losses(run(theta, r["batch"]), r["batch"]) for r in recent])
    inner = (w * losses).sum() / len(losses)
    grads = torch.autograd.grad(inner, theta, create_graph=True)
    after = [t - lr * g for t, g in zip(theta, grads)]
    lmeta = ref_meta_loss(run(after, meta), meta, how, kind)
    hg = torch.autograd.grad(lmeta, list(wref.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(wref.parameters(), hg)])


def engine_direction(model, wmod, recent, meta, how, kind, method):
    """The gradient bilevel.meta_update hands the weight module's optimizer."""
    cfg = Config()
    cfg.meta.aggregation, cfg.meta.meta_loss, cfg.meta.hypergrad, cfg.meta.fd_radius = how, kind, method, 1e-3
    bilevel.meta_update(StandInEngine(model), meta, recent, wmod, build_weight_optimizer(wmod, cfg.meta), cfg, 1)
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
                      for p in wmod.parameters()])


CASES = [(w, a, "bce", m) for w in WEIGHTS for a in AGGREGATIONS for m in ("exact", "finite_diff")] + \
        [(w, a, "mse", "exact") for w in WEIGHTS for a in AGGREGATIONS]


@pytest.mark.parametrize("weights,how,kind,method", CASES)
def test_engine_follows_the_unrolled_hypergradient_as_lr_goes_to_zero(weights, how, kind, method):
    model, recent, meta, train_domains = setup()
    torch.manual_seed(1)
    wmod = build_weight_module(weights, train_domains, N_DOMAINS, 16)
    if weights == "instance_net":  # away from the zero-initialised last layer, so every part has a gradient
        with torch.no_grad():
            wmod.mlp[2].weight.normal_(0, 0.5)
    # divided by lr: the engine leaves the inner learning rate out
    ref = {lr: unrolled_hypergradient(model, wmod, recent, meta, how, kind, lr) / lr for lr in (1e-2, 1e-5)}
    got = engine_direction(model, wmod, recent, meta, how, kind, method)
    cos = {lr: (g @ got / (g.norm() * got.norm())).item() for lr, g in ref.items()}
    ratio = (got.norm() / ref[1e-5].norm()).item()
    assert cos[1e-5] >= 0.999, cos
    assert cos[1e-5] >= cos[1e-2] - 1e-6, cos  # the first-order term is what remains as lr -> 0
    assert abs(ratio - 1) < 0.01, ratio


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("how", ["mean_logodds", "min"])
def test_a_meta_step_moves_the_weights_the_right_way(weights, how):
    """Raise the weights the meta step raised (lower those it lowered) and take the next
    inner step: the meta loss ends lower than after the opposite move. The level is held
    at its value before the step: the hypergradient treats it as a constant."""
    model, recent, meta, train_domains = setup()
    torch.manual_seed(1)
    wmod = build_weight_module(weights, train_domains, N_DOMAINS, 16)
    args = [(r["batch"]["index"], r["batch"]["domain"], r["features"]) for r in recent]
    level = wmod(*args[0])[0].detach() / wmod.positive(*args[0])[0].detach()
    w0 = torch.cat([wmod(*a) for a in args]).detach().double()
    p0 = torch.cat([wmod.positive(*a) for a in args]).detach().double()
    cfg = Config()
    cfg.meta.aggregation, cfg.meta.meta_lr = how, 0.05
    bilevel.meta_update(StandInEngine(model), meta, recent, wmod, build_weight_optimizer(wmod, cfg.meta), cfg, 1)
    move = (torch.cat([wmod.positive(*a) for a in args]).detach().double() - p0) * level.double()
    assert move.abs().max() > 1e-4  # the step did move the weights

    def meta_loss_after_inner_step(w, lr=1e-3):
        theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]

        def run(params, b):
            return torch.func.functional_call(model, dict(zip(names, params)),
                                              (b["input_ids"], b["attention_mask"], b["tag_pos"]))
        losses = torch.cat([ref_instance_losses(run(theta, r["batch"]), r["batch"]) for r in recent])
        grads = torch.autograd.grad((w * losses).sum() / len(losses), theta)
        with torch.no_grad():
            return ref_meta_loss(run([t - lr * g for t, g in zip(theta, grads)], meta), meta, how, "bce").item()

    raised, opposite = meta_loss_after_inner_step(w0 + move), meta_loss_after_inner_step(w0 - move)
    assert raised < opposite, (raised, opposite)


# ---------------------------------------------------------------- finite_diff at its default radius, random init


def _bench(name: str):
    """bench/ is not a package: its modules are loaded by path (the setup's one home, as in test_persample)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finite_diff_at_the_default_radius_holds_sign_and_error_model_at_random_init():
    """The built-in tiny Qwen2 PRM at random initialisation, fp32, full fine-tuning, MetaConfig's default
    fd_radius: bilevel.fd_alignments against bilevel's exact alignments, instance by instance.

    Error model (fd32 - exact32 = (fd32 - fd64) + (fd64 - a64) + (a64 - exact32), the 64 terms on an fp64
    copy with the same v; tests/numerics.py for kappa):
      truncation  fd64 - a64, measured at the same eps. The head's ReLU makes it O(R) where a unit's
                  pre-activation lies within R |dz/dt| of its kink (bench/fd_radius.py: up to 70% at random
                  init at R 0.01, 0.05% after 50 demo updates), else O(R^2);
      round-off   the fp32 losses l(theta +- eps v) move many ulps at R 0.01: 4 kappa ||g_i|| ||v|| (it grows as
                  1 / R below about 1e-4, where it overtakes);
      exact       2 kappa ||g_i|| ||v||.
    Signs must agree wherever |a_i| >= FLOOR ||g_i|| ||v|| (g_i and v further than 1e-3 from orthogonal), and
    there the bound must leave the sign determined (bound < |a_i|)."""
    pc, fr = _bench("persample_check"), _bench("fd_radius")
    radius = Config().meta.fd_radius
    prm, tok = pc.build("full", "fp32")  # random head (seed 0) on the tiny checkpoint
    recent = [{"batch": collate(pc.examples(8, seed=s), tok.pad_token_id)} for s in (0, 2)]
    meta = collate(pc.examples(4, seed=1), tok.pad_token_id)
    eng = StandInEngine(prm)
    v, _ = bilevel.meta_gradient(eng, meta, "mean_logodds", "bce")
    exact, vnorm = bilevel.exact_alignments(eng, recent, v)
    fd, _ = bilevel.fd_alignments(eng, recent, v, radius)
    ref = fr.fp64_side(fr.fp64_copy(prm), eng, recent, v, vnorm, [radius])
    exact, fd = torch.cat(exact).double(), torch.cat(fd).double()
    a64, fd64 = torch.tensor(ref["exact"]), torch.tensor(ref["fd"][radius])
    scale = torch.tensor(ref["gnorm"]) * vnorm
    k = kappa(rounding_shape(prm, recent[0]["batch"]["input_ids"].shape[1]), "fp32")
    truncation, round_off = fd64 - a64, 6 * k * scale
    above = a64.abs() >= fr.FLOOR * scale
    # what is left after the truncation is rounding, within the fp32 model
    assert (((fd - exact) - truncation).abs() <= round_off).all(), (((fd - exact) - truncation).abs() / round_off)
    assert above.sum() >= len(a64) // 2  # the floor leaves most instances in
    bound = truncation.abs() + round_off
    assert (bound[above] < a64.abs()[above]).all(), (bound / a64.abs())  # the error model leaves the sign held
    assert (torch.sign(fd) == torch.sign(exact))[above].all(), (fd, exact)
