"""Per-chunk kernels of the NumPy linear cross-entropy.

They mirror ``softgrad._linear_maths`` operation for operation, one row of
one column chunk at a time (docs/derivations.md#linear-cross-entropy): the
logits block ``u = h @ W_k`` comes straight from the matrix product, and
each kernel reads it once or twice while it is in cache, instead of the
dozen NumPy passes with an N x B temporary each that the generic maths
costs.

* :func:`stats` is pass 1: the bias, the chunk's ``(m_k, r_k)``
  (``chunk_rest``), folded into the running ``(m, r)`` (``merge``), the
  label's logit and, for label smoothing, the row sum.
* :func:`grad` is pass 2: ``chunk_grad`` then ``uncapped_grad``, written
  over the logits block, which the caller then multiplies into dh, dW, db.

Per-row scalars follow the NumPy path's dtype (the rows' m, r, log1p(r)
are arrays of the logits' dtype there). The row sums are accumulated in
blocks and then in float64 (``_rows.sum_exp``), at least as exact as
NumPy's pairwise sums.

They run on the calling thread, unlike the other kernels: the driver
alternates them with multi-threaded BLAS products at every chunk, and
waking a second pool of threads between those made both pools wait for
each other on a 2-core machine (each product of a chunk then took a
scheduler tick, 4-8 ms, instead of under 1 ms). One thread runs pass 1
at about 1 ns per float32 entry and pass 2 at about 0.65 ns.

Without a bias ``has_bias`` is False and ``bias`` any array of the logits'
dtype. The soft-cap's tanh (``_linear_maths.capped``) is left to NumPy,
whose tanh is vectorised, on the whole block in place: numba's is a scalar
call, which made a pass cost 25 ns per entry instead of about 1.
"""

import math

import numpy as np
from numba import njit

from ._primitives import exp, maximum, prefer_wide_vectors
from ._rows import BLOCK, row_max, sum_exp


@njit
def _sech2(a, one):
    """sech^2(a) = 4 e / (1 + e)^2 with e = exp(-2 |a|), as ``_linear_maths.uncapped_grad``.

    ``one`` is 1 in a's dtype (numba scalars carry no dtype to build constants from).
    """
    two = one + one
    e = exp(-(two * abs(a)))
    return (two * two) * e / ((one + e) * (one + e))


@njit(fastmath={"reassoc", "contract"})
def _row_sum(row):
    prefer_wide_vectors()
    total = 0.0
    n_blocks = row.shape[0] // BLOCK
    for block in range(n_blocks):
        acc = row.dtype.type(0)
        for k in range(BLOCK):
            acc += row[block * BLOCK + k]
        total += acc
    acc = row.dtype.type(0)
    for j in range(n_blocks * BLOCK, row.shape[0]):
        acc += row[j]
    return total + acc


@njit
def _stats_row(row, b, has_bias, local, m, r, want_sum, lowest):
    """Pass 1 on one row, in place; returns (m, r, the label's logit or 0, row sum)."""
    prefer_wide_vectors()
    dtype = row.dtype.type
    if has_bias:
        for j in range(row.shape[0]):
            row[j] += b[j]
    m_k = row_max(row)
    # chunk_rest: Σ_{z<0} e^z + (ties - 1), z = x - m_k; sum_exp forms the
    # same z (saturating only where it would be -inf anyway, which exp maps
    # to 0 as well). An all -inf chunk gives NaN here and is skipped below.
    if m_k == -np.inf:
        below, n_top = np.nan, 0.0
    else:
        below, n_top = sum_exp(row, m_k, None, lowest, None)
    r_k = dtype(dtype(below) + (dtype(n_top) - dtype(1.0)))
    # merge, in the rows' dtype
    one = dtype(1.0)
    if m_k > m:
        r_new = (r + one) * exp(m - m_k) + r_k
    else:
        r_new = r + (r_k + one) * exp(m_k - m)
    if m_k == -np.inf:
        r_new = r
    x_t = row[local] if 0 <= local < row.shape[0] else dtype(0)
    total = _row_sum(row) if want_sum else 0.0
    return maximum(m, m_k), r_new, x_t, total


@njit(cache=True)
def stats(u, bias, has_bias, labels, start, m, r, x_t, sum_x, want_sum, lowest):
    """Fold the chunk's logits ``u`` (rows, B) into the rows' m, r, x_t, sum_x, in place.

    ``u`` holds h @ W_k, already soft-capped if asked, and gets the bias
    added in place when ``has_bias``.
    """
    prefer_wide_vectors()
    for i in range(u.shape[0]):
        mi, ri, xt, total = _stats_row(u[i], bias, has_bias, labels[i] - start, m[i], r[i], want_sum, lowest)
        m[i] = mi
        r[i] = ri
        x_t[i] += xt
        if want_sum:
            sum_x[i] = u.dtype.type(np.float64(sum_x[i]) + total)


@njit
def _grad_entry(x, m, log_z, grow, eps_v, c):
    """chunk_grad away from the label: (p grow - eps / V) coef, p = exp((x - m) - log1p(r))."""
    return (exp((x - m) - log_z) * grow - eps_v) * c


@njit
def _grad_row(row, b, has_bias, xs, has_cap, local, m, log_z, c, grow, eps_v, eps_t, z2, lse):
    """Pass 2 on one row, in place.

    One loop per case, so that each vectorises. With a soft-cap ``row``
    holds a = u / s and ``xs`` the capped logits s tanh(a).
    """
    prefer_wide_vectors()
    dtype = row.dtype.type
    one = dtype(1.0)
    at_label = 0 <= local < row.shape[0]
    g_t = dtype(0)
    if at_label:
        # The label's entry: p_t - 1 as expm1(log p_t) (docs/derivations.md#precision).
        if has_cap:
            x = xs[local]
        else:
            x = row[local] + b[local] if has_bias else row[local]
        logp_t = (x - m) - log_z
        g_t = dtype(math.expm1(logp_t)) + eps_t
        if z2 != 0:
            g_t = g_t + z2 * lse * exp(logp_t)
        g_t = g_t * c
        if has_cap:
            g_t = g_t * _sech2(row[local], one)
    if has_cap:
        for j in range(row.shape[0]):
            row[j] = _grad_entry(xs[j], m, log_z, grow, eps_v, c) * _sech2(row[j], one)
    elif has_bias:
        for j in range(row.shape[0]):
            row[j] = _grad_entry(row[j] + b[j], m, log_z, grow, eps_v, c)
    else:
        for j in range(row.shape[0]):
            row[j] = _grad_entry(row[j], m, log_z, grow, eps_v, c)
    if at_label:
        row[local] = g_t


@njit(cache=True)
def grad(u, bias, has_bias, capped, has_cap, labels, start, m, log_z, coef, eps_v, eps_t, z_loss):
    """Overwrite the block ``u = h @ W_k`` (rows, B) by its d loss / d u.

    With a soft-cap (``has_cap``) ``u`` holds a = (h @ W_k + b) / s instead
    and ``capped`` the logits s tanh(a); otherwise ``capped`` is unused.
    """
    prefer_wide_vectors()
    dtype = u.dtype.type
    eps_v = dtype(eps_v)
    eps_t = dtype(eps_t)
    z2 = dtype(2.0 * z_loss)
    for i in range(u.shape[0]):
        lse = m[i] + log_z[i]
        # Without z-loss grow = 1 and eps_v = 0 leave p exactly as it is.
        grow = dtype(1.0) + z2 * lse if z_loss != 0 else dtype(1.0)
        _grad_row(u[i], bias, has_bias, capped[i], has_cap, labels[i] - start, m[i], log_z[i], coef[i], grow,
                  eps_v, eps_t, z2, lse)
