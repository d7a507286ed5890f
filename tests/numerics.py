"""The error model behind every precision-dependent tolerance (tests marked `numeric`).

Where the engine's hypergradient can differ from an autograd reference, and by how much. a_i = <g_i, v>,
g_i = grad l_i and v the meta gradient, both backward passes of the PRM in the run's precision.
- Each tensor a forward or backward stage writes is rounded to its dtype (relative error <= u: bf16
  2^-8, fp32 2^-24) after an fp32 accumulation of n products (error ~ sqrt(n) 2^-24, rounding errors
  of random sign). A gradient passes S stages: two per module with parameters (output and its
  gradient), two per attention, activation product and both residual adds of each layer; independent
  errors add in quadrature. S and n (the largest of hidden, intermediate, sequence length) are read
  from the model, so no bound depends on the machine's kernels or on the head size.
- Same precision (the engine vs a plain copy of the model with the engine's dtypes, or the hooks vs the
  per-instance loop): the computation is the same, only the accumulation order differs (ZeRO's linear,
  threads, unpadded shapes), which moves each stage by ~sqrt(n) 2^-24 (an output that crosses a rounding
  boundary by that much moves by one ulp as often as the shift is a fraction of the ulp), plus one rounding
  of v or of a parameter gradient to the parameter dtype (u): |da_i| <= same_tol ||g_i|| ||v||,
  same_tol = u + 2 sqrt(S) sqrt(n) 2^-24. Relative to ||g_i|| ||v||, not |a_i|: an inner product that
  cancels keeps the absolute error of its terms.
- Across precisions (bf16 finite differences vs the fp32 reference): ||dg_i|| <= kappa ||g_i||, kappa =
  sqrt(S) (u + sqrt(n) 2^-24), and |da_i| <= 2 kappa ||g_i|| ||v|| for the gradient and v; the rounded
  losses l(theta +- eps v) (radius 0.01: many ulps of every activation it moves) give a smoothed
  derivative whose rounding error has the gradient's size again, so finite differences get 4 kappa
  ||g_i|| ||v|| plus their truncation error, measured on the fp32 reference at the same eps.
- The weight module's gradient is linear in a: grad = -(1/n) sum_i a_i dw_i/dtheta, so |d grad| <=
  (1/n) sum_i |da_i| |dw_i/dtheta| elementwise; its norm is the tolerance.
tests/test_bilevel.py: the 5.7% norm error of the bf16 exact domain table on AVX512-BF16 (issue 25)
is the bf16 computation, not the hooks: a plain bf16 copy of the model without hooks gives the
engine's alignments to 0.06 u ||g_i|| ||v||, and both differ from fp32 by up to 2.8 u ||g_i|| ||v||
(one instance's gradient is 10% off in bf16); the domain table sums alignments of both signs, which
magnifies it. So exact is compared with a reference in the run's own precision. Each tolerance is
asserted to stay below half the reference's norm (a wrong scale or sign fails), except bf16 finite
differences' domain and instance-net gradients, which bf16 losses cannot resolve on this data (their
bound exceeds the gradient; the fp32 cases check those).
"""

import math

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}


def rounding_shape(prm, seq_len: int) -> tuple[int, int]:
    """(S, n) of the error model: the rounded stages a gradient of this model passes, the largest reduction."""
    c = prm.model.config
    modules = sum(1 for m in prm.modules() if any(True for _ in m.parameters(recurse=False)))
    return 2 * (modules + 4 * c.num_hidden_layers), max(c.hidden_size, c.intermediate_size, seq_len)


def same_precision_tol(shape: tuple[int, int], precision: str) -> float:
    s, n = shape
    return UNIT_ROUNDOFF[precision] + 2 * math.sqrt(s) * math.sqrt(n) * 2.0 ** -24


def kappa(shape: tuple[int, int], precision: str) -> float:
    s, n = shape
    return math.sqrt(s) * (UNIT_ROUNDOFF[precision] + math.sqrt(n) * 2.0 ** -24)
