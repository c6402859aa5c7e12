"""Kernels of the softmax family on (rows, C) C-contiguous arrays.

Each mirrors a body of ``softgrad._maths`` (named in its docstring) on one
row at a time, rows in parallel; outputs are written in place into ``out``.
``t`` is the temperature, None for 1. Rows must have C >= 1.
"""

import math

import numpy as np
from numba import njit, prange

from ._primitives import exp
from ._rows import blocked_sum, first_argmax, max_and_shift, shifted, sum_exp


@njit(parallel=True, cache=True)
def softmax(x, t, out):
    """``_maths.softmax`` without a mask: e^z / Σ e^z, 0 for an empty row."""
    no_saturation = x.dtype.type(-np.inf)  # exp(-inf) = exp(lowest) = 0
    one = x.dtype.type(1)
    for i in prange(x.shape[0]):
        row, o = x[i], out[i]
        _, m = max_and_shift(row)
        below, n_top = sum_exp(row, m, t, no_saturation, o, x[min(i + 1, x.shape[0] - 1)])
        s = x.dtype.type(below + n_top)
        # One division and C products: a vector division does not pipeline,
        # and the extra rounding stays within the few the tolerances allow.
        r = one / (one if s == 0 else s)
        for j in range(row.shape[0]):
            o[j] = o[j] * r


@njit(parallel=True, cache=True)
def log_softmax(x, t, lowest, out):
    """``_maths.log_softmax`` without a mask: z - log1p(Σ_{z<0} e^z + n_top - 1)."""
    for i in prange(x.shape[0]):
        row, o = x[i], out[i]
        _, m = max_and_shift(row)
        below, n_top = sum_exp(row, m, t, lowest, None, x[min(i + 1, x.shape[0] - 1)])
        lse = math.log1p(below + (n_top - 1.0))
        lse = x.dtype.type(0.0 if lse == -np.inf else lse)
        for j in range(row.shape[0]):
            o[j] = shifted(row[j], m, t, lowest) - lse


@njit
def _shifted_product(j, y, dy, d_top):
    return (dy[j] - d_top) * y[j]


@njit(parallel=True, cache=True)
def softmax_vjp(y, dy, out):
    """``_maths.softmax_vjp``: y (d - Σ d y) with d = dy - dy[argmax y]."""
    zero = y.dtype.type(0)
    for i in prange(y.shape[0]):
        yr, dyr, o = y[i], dy[i], out[i]
        d_top = dyr[first_argmax(yr)]
        total = y.dtype.type(blocked_sum(_shifted_product, yr.shape[0], zero, (yr, dyr, d_top)))
        for j in range(yr.shape[0]):
            o[j] = yr[j] * ((dyr[j] - d_top) - total)


@njit
def _present(j, logp, g):
    return g.dtype.type(0) if logp[j] == -np.inf else g[j]


@njit
def _except(j, g, top):
    return g.dtype.type(0) if j == top else g[j]


@njit(parallel=True, cache=True)
def log_softmax_vjp(logp, g, out):
    """``_maths.log_softmax_vjp``: g - p Σ g, the argmax set to minus the others."""
    zero = g.dtype.type(0)
    for i in prange(logp.shape[0]):
        lr, gr, o = logp[i], g[i], out[i]
        n = lr.shape[0]
        total = g.dtype.type(blocked_sum(_present, n, zero, (lr, gr)))
        for j in range(n):
            o[j] = zero if lr[j] == -np.inf else gr[j] - exp(lr[j]) * total
        top = first_argmax(lr)
        o[top] = -blocked_sum(_except, n, zero, (o, top))


@njit(parallel=True, cache=True)
def softmax_jacobian(y, t, out):
    """``_maths.softmax_jacobian``: out[n, i, j] = y_i (delta_ij - y_j) / t."""
    n_rows, n_classes = y.shape
    one = y.dtype.type(1)
    for k in prange(n_rows * n_classes):
        n, i = k // n_classes, k % n_classes
        yr, o = y[n], out[n, i]
        yi = yr[i]
        for j in range(n_classes):
            o[j] = -(yi * yr[j])
        o[i] = yi * (one - yi)
        if t is not None:
            for j in range(n_classes):
                o[j] = o[j] / t
