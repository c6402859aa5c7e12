"""Kernels for short rows (C below ``SHORT``, one block), a tile of rows at a time.

A row shorter than one block leaves the per-row kernels' vectorised loops
empty: each exponential is computed on its own and the per-row set-up costs
as much as the arithmetic (at C = 10, about 100 ns a row, as slow as naive
NumPy). Here a tile of rows has its shifted logits written into the output,
then exponentiated in one flat loop over the whole tile, which vectorises;
the per-row max, sums and scalings are short scalar loops.

Each kernel is the per-row kernel of ``_softmax.py`` or ``_cross_entropy.py``
of the same name with the exponentials taken out of the row loop: the same
maths, the same handling of -inf, NaN and saturation, results equal up to
the order of the sums. The caller picks these for C < ``SHORT``.
"""

import math

import numpy as np
from numba import njit, prange

from ._cross_entropy import _example, label_targets
from ._primitives import exp, maximum
from ._rows import BLOCK, exp_in_place, first_argmax, max_and_shift, shift_of, shifted, sum_stored

# Measured at 655360 entries, 2 threads: faster than the per-row kernels at
# every C below a block (softmax 2.3x at C = 10, 1.3x at C = 255).
SHORT = BLOCK
TILE = 4096  # entries of a tile: 16 KiB of float32, in L1 across its passes


@njit
def _tiles(n_rows, n_classes):
    """(rows per tile, number of tiles)."""
    rows = max(1, TILE // n_classes)
    return rows, (n_rows + rows - 1) // rows


# Below this C a tile's row maxima are found a column at a time, across
# rows (:func:`_tile_maxes`). Softmax at 655360 entries, ms, per row /
# across rows: C = 2: 2.58 / 1.03, 3: 1.97 / 0.92, 10: 1.13 / 0.62,
# 32: 0.57 / 0.51, 64: 0.50 / 0.52, 100: 0.49 / 0.53.
ACROSS = 64


@njit
def _tile_maxes(x, i0, i1):
    """``row_max`` of rows i0 .. i1 - 1 of x, a column at a time.

    A row's own max is a chain of C dependent steps (``maximum`` tests for
    NaN at each), as long as the rest of a short row's work. Across rows
    the steps of one column are independent and vectorise: max[r] <-
    maximum(max[r], x[i0 + r, j]), NaN for a row that holds one and -inf
    for an empty row, as ``row_max``.
    """
    maxes = np.full(i1 - i0, -np.inf, x.dtype)
    tile = x[i0:i1]
    for j in range(x.shape[1]):
        for r in range(i1 - i0):
            maxes[r] = maximum(maxes[r], tile[r, j])
    return maxes


@njit
def _shifted_tile(x, i0, i1, t, lowest, out, first=0):
    """out[i - first] <- z of row i for the tile's rows, then e^z over the
    whole tile (``first``: the row of x that out's row 0 holds). Returns
    the rows' maxima (``maxes[i - i0]``), which the callers that need them
    again take from there: for a short row finding its max costs as much
    as its exponentials."""
    across = x.shape[1] < ACROSS
    maxes = _tile_maxes(x, i0, i1) if across else np.empty(i1 - i0, x.dtype)
    for i in range(i0, i1):
        row, o = x[i], out[i - first]
        if across:
            m = shift_of(maxes[i - i0])
        else:
            maxes[i - i0], m = max_and_shift(row)
        for j in range(row.shape[0]):
            o[j] = shifted(row[j], m, t, lowest)
    exp_in_place(out.reshape(-1)[(i0 - first) * x.shape[1]: (i1 - first) * x.shape[1]])
    return maxes


@njit(parallel=True, cache=True)
def softmax(x, t, out):
    """``_softmax.softmax``: e^z / Σ e^z, 0 for an empty row."""
    rows, n_tiles = _tiles(x.shape[0], x.shape[1])
    one = x.dtype.type(1)
    for tile in prange(n_tiles):
        i0, i1 = tile * rows, min(x.shape[0], (tile + 1) * rows)
        _shifted_tile(x, i0, i1, t, None, out)
        for i in range(i0, i1):
            o = out[i]
            s = x.dtype.type(0)
            for j in range(o.shape[0]):
                s += o[j]
            r = one / (one if s == 0 else s)
            for j in range(o.shape[0]):
                o[j] = o[j] * r


@njit(parallel=True, cache=True)
def log_softmax(x, t, lowest, out):
    """``_softmax.log_softmax``: z - log1p(Σ_{z<0} e^z + n_top - 1); ``out``
    holds the tile's e^z until each row's result replaces them."""
    rows, n_tiles = _tiles(x.shape[0], x.shape[1])
    for tile in prange(n_tiles):
        i0, i1 = tile * rows, min(x.shape[0], (tile + 1) * rows)
        maxes = _shifted_tile(x, i0, i1, t, lowest, out)
        for i in range(i0, i1):
            row, o = x[i], out[i]
            m = shift_of(maxes[i - i0])
            below, n_top = sum_stored(row, m, t, lowest, o)
            lse = math.log1p(below + (n_top - 1.0))
            lse = x.dtype.type(0.0 if lse == -np.inf else lse)
            for j in range(row.shape[0]):
                o[j] = shifted(row[j], m, t, lowest) - lse


@njit(parallel=True, cache=True)
def log_softmax_vjp(logp, g, out):
    """``_softmax.log_softmax_vjp``: g - p Σ g, the argmax set to minus the
    others; ``out`` holds the tile's p = e^logp first."""
    rows, n_tiles = _tiles(logp.shape[0], logp.shape[1])
    n = logp.shape[1]
    flat_logp, flat_out = logp.reshape(-1), out.reshape(-1)
    zero = g.dtype.type(0)
    for tile in prange(n_tiles):
        i0, i1 = tile * rows, min(logp.shape[0], (tile + 1) * rows)
        for k in range(i0 * n, i1 * n):
            flat_out[k] = exp(flat_logp[k])
        for i in range(i0, i1):
            lr, gr, o = logp[i], g[i], out[i]
            total = zero
            for j in range(n):
                if lr[j] != -np.inf:
                    total += gr[j]
            for j in range(n):
                o[j] = zero if lr[j] == -np.inf else gr[j] - o[j] * total
            top = first_argmax(lr)
            others = zero
            for j in range(n):
                if j != top:
                    others += o[j]
            # a NaN at the argmax (first_argmax's 0 for a row with a NaN) stays NaN
            o[top] = lr[top] if lr[top] != lr[top] else -others


@njit(parallel=True, cache=True)
def softmax_vjp(y, dy, out):
    """``_softmax.softmax_vjp``: y (d - Σ d y) with d = dy - dy[argmax y]."""
    rows, n_tiles = _tiles(y.shape[0], y.shape[1])
    for tile in prange(n_tiles):
        for i in range(tile * rows, min(y.shape[0], (tile + 1) * rows)):
            yr, dyr, o = y[i], dy[i], out[i]
            d_top = dyr[first_argmax(yr)]
            total = y.dtype.type(0)
            for j in range(yr.shape[0]):
                total += (dyr[j] - d_top) * yr[j]
            for j in range(yr.shape[0]):
                o[j] = yr[j] * ((dyr[j] - d_top) - total)


@njit
def _exponentials(x, i0, i1, lowest, grad):
    """(g, first, maxes): the tile's e^z, in ``grad`` or, without a
    gradient, in a tile-sized scratch (the gradient formed there is then
    dropped: cheaper than a second kernel); ``first`` and ``maxes`` as in
    :func:`_shifted_tile`."""
    if grad is None:
        g, first = np.empty((i1 - i0, x.shape[1]), x.dtype), i0
    else:
        g, first = grad, 0
    return g, first, _shifted_tile(x, i0, i1, None, lowest, g, first)


@njit(parallel=True, cache=True)
def with_labels(x, labels, weight, ignore_index, a, b, z_loss, scale, lowest, loss, grad):
    """``_cross_entropy.with_labels``: e^z goes into ``grad`` a tile at a
    time, and each row's loss and gradient are formed from it."""
    rows, n_tiles = _tiles(x.shape[0], x.shape[1])
    for tile in prange(n_tiles):
        i0, i1 = tile * rows, min(x.shape[0], (tile + 1) * rows)
        g, first, maxes = _exponentials(x, i0, i1, lowest, grad)
        for i in range(i0, i1):
            label, ai, bi, v = label_targets(labels[i], ignore_index, a, b)
            loss[i] = _example(x[i], g[i - first], label, None, weight, ai, bi, v, z_loss, scale, lowest, None,
                               maxes[i - i0])


@njit(parallel=True, cache=True)
def with_soft_labels(x, soft, weight, a, b, z_loss, scale, lowest, loss, grad):
    """``_cross_entropy.with_soft_labels``, a tile at a time as :func:`with_labels`."""
    rows, n_tiles = _tiles(x.shape[0], x.shape[1])
    for tile in prange(n_tiles):
        i0, i1 = tile * rows, min(x.shape[0], (tile + 1) * rows)
        g, first, maxes = _exponentials(x, i0, i1, lowest, grad)
        for i in range(i0, i1):
            loss[i] = _example(x[i], g[i - first], 0, soft[i], weight, a, b, 1.0, z_loss, scale, lowest, None,
                               maxes[i - i0])
