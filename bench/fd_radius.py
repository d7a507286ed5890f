"""finite_diff's radius: its alignments against the exact ones, at random initialisation and after training.

    OMP_NUM_THREADS=1 python bench/fd_radius.py                    # the demo, 50 updates, about a minute
    python bench/fd_radius.py --radii 1e-2 1e-3 --train_steps 100

The built-in demo (tiny Qwen2, full fine-tuning, fp32, one process): a few fixed probe batches (the first
training and meta batches of the demo's streams) are measured at the random initialisation and after
--train_steps updates of the demo (its own meta passes included). For every probe meta batch, v is taken
once and the alignments a_i = <grad l_i, v> of every probe training instance come from bilevel's exact
method and from bilevel.fd_alignments at each radius R (eps = R / ||v||), all in fp32 as in a run.

Where the difference comes from (central differences, f(t) = l_i(theta + t v / ||v||)):
  truncation  fd - a = ||v|| R^2 f'''(0) / 6 + O(R^4): falls as R^2;
  round-off   the fp32 losses l_i(theta +- eps v) are each off by about u |l_i| (u = 2^-24, times the
              forward's amplification), divided by 2 eps: ~ u |l_i| ||v|| / R, grows as R falls.
To tell the two apart, the same alignments and finite differences are also computed on an fp64 copy of
the model with the same v: fd64 - exact64 is the truncation alone, fd32 - fd64 the round-off alone.

Columns, over all (meta batch, instance) pairs of a point:
  cos          cosine between the fd32 and exact32 alignment vectors;
  scale max    max over instances above the floor of | |fd| / |exact| - 1 |; median the same, median;
  signs        instances above the floor whose fd sign matches exact's / instances above the floor
               (the floor: |a_i| >= FLOOR ||g_i|| ||v||, g_i = grad l_i, i.e. g_i and v more than 1e-3 from
               orthogonal; below it a_i is a cancellation whose sign fp32 itself does not hold);
  trunc max    max over those instances of |fd64 - a64| / |a64| (truncation only);
  round max    max over all instances of |fd32 - fd64| / (||g_i|| ||v||) (round-off only, relative to the
               size of the terms the inner product sums).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import tempfile

import torch

from dreamprm import bilevel, engine, hypergrad, persample
from dreamprm.config import load_config
from dreamprm.data import sources
from dreamprm.model import build_prm
from dreamprm.train import build

RADII = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
FLOOR = 1e-3  # |a_i| / (||g_i|| ||v||) below which an alignment counts as noise for the sign


def probes(run, n_train: int, n_meta: int):
    """The first n_train training and n_meta meta batches of fresh copies of the demo's streams."""
    cfg, data, pad = run.cfg, run.data, run.eng.tokenizer.pad_token_id
    ts = sources.train_stream(cfg, data, pad, 0, 1, run.state.wmod)
    ms = sources.meta_stream(cfg, data, pad, 0, 1)
    return ([{"batch": run.eng.to_device(next(ts))} for _ in range(n_train)],
            [run.eng.to_device(next(ms)) for _ in range(n_meta)])


def rms_norm_fp64(norm):
    """transformers' RMSNorm forward in its input's dtype (the original computes in fp32 whatever its input)."""
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    return forward


def fp64_copy(module):
    """The PRM in fp64 throughout: RMSNorm's fp32 arithmetic would round the fp64 side, so its forward is
    replaced on the copy by the same formula in fp64."""
    ref = copy.deepcopy(module).double().eval()
    for m in ref.modules():
        if hasattr(m, "variance_epsilon") and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
            m.forward = rms_norm_fp64(m)
    return ref


def losses64(ref, b: dict, spec) -> torch.Tensor:
    """hypergrad.instance_losses of PRM.forward in fp64. Both cast to fp32 (the logits), whose rounding would pose
    as truncation error here, so this is the same forward (padded batches) and the demo's step loss, plain soft
    cross-entropy, without the casts."""
    assert spec.kind == "ce", spec
    h = ref.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).last_hidden_state
    h = torch.gather(h, 1, b["tag_pos"].unsqueeze(-1).expand(-1, -1, h.size(-1)))
    logp = torch.log_softmax(ref.score(h), dim=-1)
    y = b["labels"].double()
    if spec.hard:
        y = (y >= 0.5).double()
    m = b["label_mask"].double()
    return ((-y * logp[..., 1] - (1 - y) * logp[..., 0]) * m).sum(-1) / m.sum(-1).clamp_min(1)


def fp64_side(ref, eng, recent: list, v, vnorm: float, radii) -> dict:
    """Exact alignments, ||g_i|| and central differences at each radius on the fp64 copy `ref`, same v."""
    params = [p for p in ref.parameters() if p.requires_grad]
    v64 = [v.parts[p].double() for p in eng.params]
    a, gn = [], []
    for r in recent:
        b = r["batch"]
        losses = losses64(ref, b, eng.step_loss)
        for li in losses:
            g = torch.autograd.grad(li, params, retain_graph=True)
            a.append(sum((x * d).sum() for x, d in zip(g, v64)).item())
            gn.append(math.sqrt(sum((x * x).sum().item() for x in g)))
    fd = {}
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for radius in radii:
            eps = radius / vnorm
            out = {}
            for sign in (1.0, -1.0):
                for p, s, d in zip(params, saved, v64):
                    p.copy_(s + sign * eps * d)
                out[sign] = torch.cat([losses64(ref, r["batch"], eng.step_loss) for r in recent])
            fd[radius] = ((out[1.0] - out[-1.0]) / (2 * eps)).tolist()
        for p, s in zip(params, saved):
            p.copy_(s)
    return {"exact": a, "gnorm": gn, "fd": fd}


def measure(eng, recent: list, metas: list, cfg, radii) -> dict:
    """Per radius, the columns of the table (see the module docstring) at the engine's current parameters."""
    ref = fp64_copy(eng.module)
    rows = {"exact": [], "exact64": [], "scale": [], "fd": {r: [] for r in radii}, "fd64": {r: [] for r in radii}}
    for mb in metas:
        try:
            with persample.dropout_off(eng.module):
                v, _ = bilevel.meta_gradient(eng, mb, cfg.meta.aggregation, cfg.meta.meta_loss)
                exact, vnorm = bilevel.exact_alignments(eng, recent, v)
                fd = {r: bilevel.fd_alignments(eng, recent, v, r)[0] for r in radii}
        finally:
            eng.zero_grad()
        f64 = fp64_side(ref, eng, recent, v, vnorm, radii)
        rows["exact"] += torch.cat(exact).double().tolist()
        rows["exact64"] += f64["exact"]
        rows["scale"] += [g * vnorm for g in f64["gnorm"]]
        for r in radii:
            rows["fd"][r] += torch.cat(fd[r]).double().tolist()
            rows["fd64"][r] += f64["fd"][r]
    ex, ex64, scale = (torch.tensor(rows[k], dtype=torch.float64) for k in ("exact", "exact64", "scale"))
    above = ex64.abs() >= FLOOR * scale
    out = {}
    for r in radii:
        fd, fd64 = torch.tensor(rows["fd"][r], dtype=torch.float64), torch.tensor(rows["fd64"][r], dtype=torch.float64)
        rel = (fd.abs() / ex.abs() - 1).abs()[above]
        out[r] = {"cos": (fd @ ex / (fd.norm() * ex.norm())).item(),
                  "scale_max": rel.max().item(), "scale_median": rel.median().item(),
                  "signs": int((torch.sign(fd) == torch.sign(ex))[above].sum()), "above": int(above.sum()),
                  "n": len(ex), "trunc_max": ((fd64 - ex64).abs() / ex64.abs())[above].max().item(),
                  "round_max": ((fd - fd64).abs() / scale).max().item()}
    return out


def bf16_lora(cfg, recent: list, metas: list, radii, seed: int) -> dict:
    """Production's setting at random initialisation: LoRA on a bf16 base with the adapters and the head in fp32
    (what ZeRO-3 keeps; ZeRO 0-2 would cast the adapters to bf16 and the engine refuses finite_diff), so the
    perturbation lands exactly but the forward rounds every activation to bf16. Against exact alignments of an
    fp32 copy of the same model (same v), per radius: the columns of the table (trunc / round: not split)."""
    mcfg = dataclasses.replace(cfg.model, mode="lora", lora_dropout=0.0)
    torch.manual_seed(seed)
    prm, _ = build_prm(mcfg, "bf16")
    for p in prm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    prm.eval()
    ref = copy.deepcopy(prm).float()
    params, rparams = ([p for p in m.parameters() if p.requires_grad] for m in (prm, ref))
    spec = hypergrad.StepLoss()

    def losses(m, b):
        return hypergrad.instance_losses(m(b["input_ids"], b["attention_mask"], b["tag_pos"]), b, spec)

    ex, scale, fd = [], [], {r: [] for r in radii}
    for mb in metas:
        lm = hypergrad.meta_loss(ref(mb["input_ids"], mb["attention_mask"], mb["tag_pos"]), mb,
                                 cfg.meta.aggregation, cfg.meta.meta_loss)
        v = [g.detach() for g in torch.autograd.grad(lm, rparams)]
        vnorm = math.sqrt(sum((x.double() ** 2).sum().item() for x in v))
        for r in recent:
            for li in losses(ref, r["batch"]):
                g = torch.autograd.grad(li, rparams, retain_graph=True)
                ex.append(sum((x.double() * d.double()).sum() for x, d in zip(g, v)).item())
                scale.append(math.sqrt(sum((x.double() ** 2).sum().item() for x in g)) * vnorm)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for radius in radii:
                eps, out = radius / vnorm, {}
                for sign in (1.0, -1.0):
                    for p, s0, d in zip(params, saved, v):
                        p.copy_(s0 + sign * eps * d)
                    out[sign] = torch.cat([losses(prm, r["batch"]) for r in recent]).double()
                fd[radius] += ((out[1.0] - out[-1.0]) / (2 * eps)).tolist()
            for p, s0 in zip(params, saved):
                p.copy_(s0)
    ex, scale = torch.tensor(ex, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
    above = ex.abs() >= FLOOR * scale
    res = {}
    for r in radii:
        f = torch.tensor(fd[r], dtype=torch.float64)
        rel = (f.abs() / ex.abs() - 1).abs()[above]
        res[r] = {"cos": (f @ ex / (f.norm() * ex.norm())).item(), "scale_max": rel.max().item(),
                  "scale_median": rel.median().item(), "signs": int((torch.sign(f) == torch.sign(ex))[above].sum()),
                  "above": int(above.sum()), "n": len(ex), "trunc_max": math.nan,
                  "round_max": ((f - ex).abs() / scale).max().item()}
    return res


def table(results: dict) -> str:
    lines = ["| point | radius | cos | scale max | scale median | signs | trunc max | round max |",
             "|---|---|---|---|---|---|---|---|"]
    for point, per in results.items():
        for r, x in per.items():
            lines.append(f"| {point} | {r:g} | {x['cos']:.6f} | {x['scale_max']:.2%} | {x['scale_median']:.3%} | "
                         f"{x['signs']}/{x['above']} ({x['n']}) | {x['trunc_max']:.2%} | {x['round_max']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    p.add_argument("--train_steps", type=int, default=50, help="demo updates before the second measurement")
    p.add_argument("--train_batches", type=int, default=4, help="probe training batches (4 instances each)")
    p.add_argument("--meta_batches", type=int, default=4, help="probe meta batches (one v each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16_lora", action="store_true", help="also LoRA on a bf16 base at init (fp32 adapters, head)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dreamprm-fd-radius-") as tmp:
        cfg, _ = load_config(["--output_dir", tmp, "--disable_wandb", "--seed", str(a.seed),
                              "--total_steps", str(max(1, a.train_steps))])
        rank, world = engine.init_distributed()
        torch.manual_seed(cfg.train.seed)
        run = build(cfg, rank, world, None, load_universal=False)
        recent, metas = probes(run, a.train_batches, a.meta_batches)
        st, results = run.state, {}
        results["init"] = measure(run.eng, recent, metas, cfg, a.radii)
        for step in range(1, a.train_steps + 1):  # the demo's updates and meta passes (its own fd_radius)
            out = engine.inner_update(run.eng, st.train_stream, st.wmod, False, step)
            bilevel.meta_update(run.eng, next(st.meta_stream), out["recent"], st.wmod, st.wopt, cfg, step)
        if a.train_steps:
            results[f"after {a.train_steps}"] = measure(run.eng, recent, metas, cfg, a.radii)
        if a.bf16_lora:
            results["init, LoRA bf16"] = bf16_lora(cfg, recent, metas, a.radii, a.seed)
    print(f"finite_diff vs exact alignments, demo (tiny Qwen2, full, fp32), {datetime.date.today()}; "
          f"floor |a_i| >= {FLOOR:g} ||g_i|| ||v||; demo meta passes at fd_radius {cfg.meta.fd_radius:g}")
    print(table(results))


if __name__ == "__main__":
    main()
