"""Hook alignments (dreamprm.persample) against the per-instance autograd loop."""

import importlib.util
from pathlib import Path

import pytest
import torch
from numerics import rounding_shape, same_precision_tol
from torch import nn

from dreamprm import persample
from dreamprm.config import ModelConfig
from dreamprm.data.loader import collate
from dreamprm.data.packing import collate_packed, select
from dreamprm.model import build_prm
from dreamprm.tiny import default_tiny_dir


def _bench_setup():
    """The setup (examples, model, v, losses, comparison) lives in bench/persample_check.py, which prints the
    figures behind these tests; bench/ is not a package, so it is loaded by its path."""
    path = Path(__file__).resolve().parents[1] / "bench" / "persample_check.py"
    spec = importlib.util.spec_from_file_location("bench_persample_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_setup = _bench_setup()
examples, build, random_v, losses_fn, compare = (_setup.examples, _setup.build, _setup.random_v, _setup.losses_fn,
                                                 _setup.compare)


def saved_bytes(fn) -> tuple[object, int]:
    """(fn(), bytes of the distinct tensors autograd saved for backward while fn ran)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def grad_norms(params, batch, f) -> torch.Tensor:
    """||grad l_i|| of every instance (the scale of the error model's bound, tests/numerics.py)."""
    out = []
    for i in range(len(batch["index"])):
        gs = torch.autograd.grad(f(select(batch, i))[0], list(params.values()), allow_unused=True)
        out.append(sum((g.double() ** 2).sum() for g in gs if g is not None).sqrt())
    return torch.stack(out)


@pytest.mark.numeric
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_hook_alignments_match_per_instance_loop(mode, precision, layout):
    """Same model, same precision: the hooks and the loop differ by the loop's rounding of the parameter
    gradient to its dtype and by accumulation order (unpadded shapes), bounded per instance by
    same_precision_tol ||g_i|| ||v|| (tests/numerics.py), whatever the CPU's bf16 kernels."""
    prm, tok = build(mode, precision)
    ex = examples()
    batch = collate(ex, tok.pad_token_id) if layout == "padded" else collate_packed(ex, tok.pad_token_id, row_tokens=60)
    if layout == "packed":
        assert batch["input_ids"].shape[0] < len(ex)  # several instances share a row
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    # v like a meta gradient (the batch's gradient, plus noise): a random v alone is nearly orthogonal
    # to every g_i, and an alignment far below ||g_i|| ||v|| cannot be checked relative to that scale
    mean = torch.autograd.grad(losses_fn(prm)(batch).sum(), list(params.values()))
    v = {p: x + g.float() for (p, x), g in zip(random_v(params).items(), mean)}
    a, slow = persample.exact(prm, params, v, batch, losses_fn(prm), head=prm.score)
    assert slow == []  # Qwen2: Linear, Embedding and RMSNorm cover every trainable parameter
    ref = persample.reference(params, v, batch, losses_fn(prm))
    vnorm = torch.sqrt(sum((x.double() ** 2).sum() for x in v.values()))
    # floor at the batch's RMS gradient: an activation that rounds differently moves an instance's loss
    # derivative by the curvature times the shift, which does not vanish with a well-fit instance's g_i
    gn = grad_norms(params, batch, losses_fn(prm))
    bound = same_precision_tol(rounding_shape(prm, batch["input_ids"].shape[1]), precision) * vnorm \
        * gn.clamp(min=gn.pow(2).mean().sqrt().item())
    assert bound.max() < 0.5 * ref.abs().max()  # the bound can fail
    worst = ((a.double() - ref.double()).abs() / bound).max().item()
    assert worst <= 1, (worst, a, ref, bound)
    assert all(p.grad is None for p in params.values())  # no parameter gradient was accumulated


@pytest.mark.numeric
def test_fp32_reference_in_double_agrees():
    """The fp32 check is not loose: the reference loop itself agrees with a float64 run."""
    prm, tok = build("full")
    batch = collate(examples(3), tok.pad_token_id)
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    v = random_v(params)
    a, _ = persample.exact(prm, params, v, batch, losses_fn(prm), head=prm.score)
    prm.double()
    v64 = {p: x.double() for p, x in zip(params.values(), v.values())}
    a64, _ = persample.exact(prm, params, v64, batch, losses_fn(prm), head=prm.score)
    cos, rel = compare(a, a64)
    assert cos >= 0.999999 and rel <= 1e-5


class Scale(nn.Module):
    """A layer the hooks do not know: y = x * s."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.s


def test_uncovered_parameters_are_named_and_take_the_slow_path():
    prm, tok = build("lora")
    prm.score.insert(1, Scale(prm.score[0].out_features))  # score: Linear, Scale, ReLU, Linear
    batch = collate_packed(examples(4), tok.pad_token_id, row_tokens=60)
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    v = random_v(params)
    a, slow = persample.exact(prm, params, v, batch, losses_fn(prm), head=prm.score)
    assert slow == ["score.1.s"]
    ref = persample.reference(params, v, batch, losses_fn(prm))
    cos, rel = compare(a, ref)
    assert cos >= 0.99999 and rel <= 1e-4
    # without the slow path the Scale term would be missing: it is not negligible here
    covered_only = a - persample.slow_path(params, v, batch, losses_fn(prm), slow)
    assert compare(covered_only, ref)[1] > 1e-3


def test_rmsnorm_variant_that_breaks_the_formula_is_demoted():
    prm, tok = build("full")
    norm = prm.model.norm
    orig = norm.forward
    norm.forward = lambda x: orig(x) + 0.5 * norm.weight  # a norm with an extra offset term
    batch = collate(examples(3), tok.pad_token_id)
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    v = random_v(params)
    a, slow = persample.exact(prm, params, v, batch, losses_fn(prm), head=prm.score)
    assert slow == ["model.norm.weight"]
    cos, rel = compare(a, persample.reference(params, v, batch, losses_fn(prm)))
    assert cos >= 0.99999 and rel <= 1e-4


def test_scaled_backward_with_parameter_gradients():
    """Inside a training backward (loss = sum_i c_i l_i, parameter gradients computed) result()
    divides c_i out and gives the same a_i."""
    prm, tok = build("lora")
    batch = collate(examples(4), tok.pad_token_id)
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    v = random_v(params)
    c = torch.tensor([0.3, 1.7, 0.9, 0.05]) / 4
    with persample.Alignments(prm, params, v, head=prm.score) as tap:
        tap.begin(batch)
        (c * losses_fn(prm)(batch)).sum().backward()
        a = tap.result(c)
    assert all(p.grad is not None for p in params.values())
    cos, rel = compare(a, persample.reference(params, v, batch, losses_fn(prm)))
    assert cos >= 0.99999 and rel <= 1e-4


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_alignments(reentrant):
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(default_tiny_dir()), mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      attn_implementation="sdpa", gradient_checkpointing=True, gc_reentrant=reentrant)
    prm, tok = build_prm(cfg, "fp32")
    prm.train()  # transformers checkpoints only in train mode
    batch = collate(examples(3), tok.pad_token_id)
    params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
    v = random_v(params)
    a, _ = persample.exact(prm, params, v, batch, losses_fn(prm), head=prm.score)
    cos, rel = compare(a, persample.reference(params, v, batch, losses_fn(prm)))
    assert cos >= 0.99999 and rel <= 1e-4


def test_meta_forward_keeps_gradient_checkpointing():
    """dropout_off keeps train mode: the meta forward saves what the inner step's forward saves
    (eval mode would silently turn transformers' checkpointing off), and dropout is really off."""
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(default_tiny_dir()), mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.3,
                      attn_implementation="sdpa", gradient_checkpointing=True)
    prm, tok = build_prm(cfg, "fp32")
    prm.train()
    batch = collate(examples(4), tok.pad_token_id)
    f = losses_fn(prm)
    _, inner = saved_bytes(lambda: f(batch))
    with persample.dropout_off(prm):
        meta1, meta_bytes = saved_bytes(lambda: f(batch))
        meta2 = f(batch)
        assert prm.training
    torch.testing.assert_close(meta1, meta2, rtol=0, atol=0)  # no dropout noise
    assert all(m.training for m in prm.modules() if isinstance(m, nn.Dropout))  # restored
    prm.eval()
    _, eval_bytes = saved_bytes(lambda: f(batch))
    assert meta_bytes == inner
    assert eval_bytes > 2 * inner  # what module.eval() did to the meta pass
