"""Per-instance alignments a_i = <grad l_i, v> for every instance of a batch from one backward.

Plain torch (no DeepSpeed): forward hooks on the layers that own trainable parameters put a small
autograd node on each layer's output; in the backward that node sees the gradient of the output
and combines it with the layer's saved input and that layer's slice of v.

The math. Backpropagate L = sum_i c_i l_i (c_i > 0 known: 1 for the exact pass, w_i / (B * accum)
inside a training step). Instance i's tokens influence only l_i (padded rows are independent;
packed rows have block-diagonal attention), so at every token t of instance i the output gradient
g_t = dL/dy_t equals c_i * dl_i/dy_t. For a layer applied token by token, grad l_i w.r.t. its
weight is a sum over i's tokens of per-token terms, and so is its dot product with v:

  Linear  y = x W^T + b     dl_i/dW = sum_t g_t x_t^T    <dl_i/dW, V> = sum_t <g_t, V x_t>
                            dl_i/db = sum_t g_t          <dl_i/db, v_b> = sum_t <g_t, v_b>
  Embedding y = E[id]       dl_i/dE = sum_t e_{id_t} g_t^T                 = sum_t <g_t, V[id_t]>
  RMSNorm y = w * u(x)      dl_i/dw = sum_t g_t * u_t                      = sum_t <g_t * u_t, v_w>

(x_t the layer's input at token t, u_t the normalised input; LoRA's A and B factors are Linear
layers, so LoRA is covered by the first line.) Per layer this costs one [tokens, in] x [in, out]
product (x V^T), the size of the layer's forward, and never forms a per-instance gradient; the
per-token scalars are summed into their instance with one scatter-add. The layer's weight is not
needed, only its input, its output gradient and v's slice, so under ZeRO-3 v can be gathered
one layer at a time (v is read through v[param] only when that layer's backward runs). A layer
called several times (or a parameter shared by two layers) adds one term per call, which is what
the gradient of a shared parameter is.

Which instance a token belongs to: backbone layers see [R, S, ...] tokens; a padded batch has
one instance per row, a packed batch (data.packing.collate_packed) several, located by
seq_row / seq_start / seq_len (the pad tail of a row belongs to none). Layers under `head`
(the PRM's score head) see [N, K, ...], one row per instance.

Parameters the rules do not cover (a custom layer, an RMSNorm variant whose output does not
match the formula above, a parameter of a module that is not one of the three kinds) are named
in `uncovered` and handled by a slow path: one forward and backward per instance for those
parameters only. Nothing is dropped from a_i.

Gradient checkpointing: the node saves the layer input with save_for_backward, which goes
through torch's saved-tensor hooks, so non-reentrant checkpointing frees and recomputes it like
the layer's own saved input (no extra activation memory); under reentrant checkpointing the
node is only added in the recompute (the first forward runs without grad).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from dreamprm.data import packing


@contextmanager
def dropout_off(model: nn.Module):
    """Dropout off, the module otherwise left in train mode.

    module.eval() would also switch transformers' gradient checkpointing off (it checkpoints only
    while self.training), so a meta pass in eval mode keeps every layer's activations. Here only
    nn.Dropout modules go to eval and float `attention_dropout` attributes (read by the attention
    kernels of transformers models) are set to 0; both are restored on exit.
    """
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    attn = [(m, m.attention_dropout) for m in model.modules()
            if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0]
    for m in drops:
        m.eval()
    for m, _ in attn:
        m.attention_dropout = 0.0
    try:
        yield
    finally:
        for m in drops:
            m.train()
        for m, p in attn:
            m.attention_dropout = p


def _is_rmsnorm(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), nn.Parameter) and getattr(m, "bias", None) is None)


def _rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """u(x) of the Llama/Qwen2 RMSNorm: normalised in fp32, cast back to the input dtype."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if _is_rmsnorm(m):
        return "rmsnorm"
    return None


def token_instances(batch: dict) -> tuple[torch.Tensor, int]:
    """(instance id of every backbone token [R*S], N); tokens of no instance get id N."""
    n = len(batch["index"])
    r, s = batch["input_ids"].shape
    dev = batch["input_ids"].device
    if not packing.is_packed(batch):
        return torch.arange(r, device=dev).repeat_interleave(s), n
    ids = torch.full((r * s,), n, dtype=torch.long, device=dev)
    for i in range(n):
        at = int(batch["seq_row"][i]) * s + int(batch["seq_start"][i])
        ids[at:at + int(batch["seq_len"][i])] = i
    return ids, n


class _Tap(torch.autograd.Function):
    """Identity on y; its backward hands (saved input, output gradient) to the collector."""

    @staticmethod
    def forward(ctx, y, x, sink, layer):
        ctx.save_for_backward(x)
        ctx.layer = layer
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.layer.collect(x, g)
        ctx.layer = None  # a graph node something keeps alive must not keep v alive through the hooks
        return g, None, torch.zeros((), device=g.device) if ctx.needs_input_grad[2] else None, None


class _Layer:
    """One hooked module: its kind, its trainable parameters in `params`, and the accumulator."""

    def __init__(self, owner: Alignments, name: str, module: nn.Module, kind: str, in_head: bool):
        self.owner, self.name, self.module, self.kind, self.in_head = owner, name, module, kind, in_head
        self.weight = module.weight if module.weight in owner.wanted else None
        b = getattr(module, "bias", None)
        self.bias = b if b is not None and b in owner.wanted else None

    def forward_hook(self, module, args, y):
        own = self.owner
        if not own.active or not torch.is_grad_enabled():  # reentrant checkpointing's first forward
            return None
        x = args[0]
        if self.kind == "rmsnorm" and self.name not in own.demoted:
            with torch.no_grad():  # the formula must reproduce this module's output, else the slow path
                ok = torch.allclose((module.weight * _rms_normalise(x, module.variance_epsilon)).float(),
                                    y.float(), rtol=1e-2, atol=1e-3)
            if not ok:
                own.demote(self)
        if self.name in own.demoted:
            return None
        return _Tap.apply(y, x.detach(), own.sink, self)

    def collect(self, x: torch.Tensor, g: torch.Tensor) -> None:
        own = self.owner
        ids = own.head_ids if self.in_head else own.tok_ids
        g = g.reshape(-1, g.shape[-1]).float()
        if g.shape[0] != ids.numel():
            raise RuntimeError(f"persample: layer {self.name} saw {g.shape[0]} tokens but the batch layout "
                               f"has {ids.numel()} ({'head rows N*K' if self.in_head else 'backbone R*S'}); "
                               "is `head` the module applied at the step tags?")
        s = torch.zeros(g.shape[0], device=g.device)
        if self.kind == "linear":
            xs = x.reshape(-1, x.shape[-1])
            if self.weight is not None:
                s += ((xs.float() @ own.v[self.weight].to(g.device).float().t()) * g).sum(-1)
            if self.bias is not None:
                s += g @ own.v[self.bias].to(g.device).float()
        elif self.kind == "embedding":
            s += (own.v[self.weight].to(g.device).float()[x.reshape(-1)] * g).sum(-1)
        else:  # rmsnorm
            u = _rms_normalise(x, self.module.variance_epsilon).reshape(-1, x.shape[-1]).float()
            s += (g * u) @ own.v[self.weight].to(g.device).float()
        own.acc.index_add_(0, ids.to(g.device), s.to(own.acc.dtype))


class Alignments:
    """Hooks that turn backwards through `model` into per-instance alignments with v.

    params: {name: parameter} of the trainable parameters a_i is taken over.
    v:      anything with v[parameter] -> the full-shape slice of v for that parameter (a dict, or
            an object that gathers shards on demand); read inside the backward only.
    head:   the submodule applied to [N, K, ...] per-instance rows (PRM.score), or None.

    covered / uncovered: parameter names handled by the hooks / left to the slow path.
    Use as a context manager (hooks removed on exit); `begin(batch)` before each forward,
    `result(scale)` after its backward.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter], v, head: nn.Module | None = None):
        self.model, self.params, self.v, self.head = model, dict(params), v, head
        self.wanted = set(self.params.values())
        head_mods = set(head.modules()) if head is not None else set()
        self.layers, self.demoted, self.handles = [], set(), []
        seen = set()
        for name, m in model.named_modules():
            kind = _kind(m)
            if kind is None:
                continue
            own = [p for p in m.parameters(recurse=False) if p in self.wanted]
            if not own:
                continue
            layer = _Layer(self, name, m, kind, m in head_mods)
            self.layers.append(layer)
            seen.update(p for p in (layer.weight, layer.bias) if p is not None)
        self.covered = [n for n, p in self.params.items() if p in seen]
        self._uncovered = [n for n, p in self.params.items() if p not in seen]
        self.active, self.sink, self.acc = False, None, None
        self.tok_ids = self.head_ids = None

    @property
    def uncovered(self) -> list[str]:
        return list(self._uncovered)

    def demote(self, layer: _Layer) -> None:
        """A layer whose formula check failed: its parameters go to the slow path from now on."""
        self.demoted.add(layer.name)
        for p in (layer.weight, layer.bias):
            if p is None:
                continue
            name = next(n for n, q in self.params.items() if q is p)
            if name in self.covered:
                self.covered.remove(name)
                self._uncovered.append(name)

    def __enter__(self):
        for layer in self.layers:  # prepend: run before ZeRO-3's post-forward hook releases weights
            self.handles.append(layer.module.register_forward_hook(layer.forward_hook, prepend=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.active = False
        self.v = self.acc = self.tok_ids = self.head_ids = None  # nothing of v outlives the pass

    def begin(self, batch: dict, sink: torch.Tensor | None = None) -> None:
        """Arm the hooks for one forward/backward of `batch`.

        sink: a scalar leaf every hooked node connects to, so torch.autograd.grad(loss, sink) runs the
              activation backward without computing any parameter gradient (the exact pass).
        """
        self.tok_ids, n = token_instances(batch)
        k = batch["tag_pos"].shape[1]
        self.head_ids = torch.arange(n, device=self.tok_ids.device).repeat_interleave(k)
        self.acc = torch.zeros(n + 1, dtype=torch.float64, device=self.tok_ids.device)
        self.sink = sink
        self.active = True

    def result(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The covered part of a_i [N] (fp32, on the batch's device) after the backward.

        scale: the c_i of the loss that was backpropagated, sum_i c_i l_i ([N], default 1); divided out.
        """
        self.active = False
        a = self.acc[:-1]
        if scale is not None:
            a = a / scale.double().to(a.device)
        return a.float()


def exact(model: nn.Module, params: Mapping[str, nn.Parameter], v, batch: dict,
          losses_fn: Callable[[dict], torch.Tensor], head: nn.Module | None = None) -> tuple[torch.Tensor, list[str]]:
    """a_i for every instance of `batch` and the names of the parameters that took the slow path.

    losses_fn(batch) -> per-instance losses [N] (runs the forward). One forward and one activation
    backward for the covered parameters (no parameter gradient is computed); then, only if some
    parameters are uncovered, one forward/backward per instance for those.
    """
    sink = torch.zeros((), requires_grad=True, device=batch["input_ids"].device)
    with Alignments(model, params, v, head) as tap:
        tap.begin(batch, sink=sink)
        losses = losses_fn(batch)
        torch.autograd.grad(losses.sum(), sink, allow_unused=True)
        a = tap.result()
        slow = tap.uncovered
    if slow:
        a = a + slow_path(params, v, batch, losses_fn, slow).to(a.device)
    return a, slow


def slow_path(params: Mapping[str, nn.Parameter], v, batch: dict, losses_fn, names: list[str]) -> torch.Tensor:
    """<grad l_i, v> restricted to `names`: one forward and backward per instance."""
    ps = [params[n] for n in names]
    vs = [v[p].float() for p in ps]  # read once, before the (per-rank) instance loop
    out = torch.zeros(len(batch["index"]))
    for i in range(len(out)):
        one = packing.select(batch, i)
        grads = torch.autograd.grad(losses_fn(one)[0], ps, allow_unused=True)
        out[i] = sum(((g.float() * x.to(g.device)).sum() for g, x in zip(grads, vs) if g is not None),
                     torch.zeros((), dtype=torch.float64)).item()
    return out


def reference(params: Mapping[str, nn.Parameter], v, batch: dict, losses_fn) -> torch.Tensor:
    """The per-instance loop over every parameter (the test reference)."""
    return slow_path(params, v, batch, losses_fn, list(params))
