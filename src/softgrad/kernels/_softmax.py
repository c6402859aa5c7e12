"""Kernels of the softmax family on (rows, C) C-contiguous arrays.

Each mirrors a body of ``softgrad._maths`` (named in its docstring) on one
row at a time, bands of rows in parallel; outputs are written in place into
``out``. ``t`` is the temperature, None for 1. Rows must have C >= 1. The
kernels whose output may be larger than the caches take ``stream`` (write
it with streaming stores) and ``n_bands``, as :func:`softmax` explains.
"""

import math

import numpy as np
from numba import njit, prange

from ._primitives import address, exp, prefer_wide_vectors, store_fence
from ._rows import (
    _LINE,
    _REDUCE,
    BLOCK,
    band_rows,
    blocked_sum,
    exp_total,
    first_argmax,
    max_and_shift,
    prefetch_block,
    scaled,
    shifted,
    stream_block_of,
    stream_plan,
    stream_row,
    stream_span,
    sum_exp,
    to_boundary,
    write_unstreamed,
)


@njit(parallel=True, cache=True)
def softmax(x, t, out, stream, n_bands):
    """``_maths.softmax`` without a mask: e^z / Σ e^z, 0 for an empty row.

    ``stream``: write ``out`` with streaming stores (:func:`_rows.stream_row`).
    A row's e^z then go to one of two scratch rows, and its output is
    written during the next row's exponentials (``exp_total``'s
    ``behind``), the band's last row after them. ``n_bands``: how many
    bands of rows run in parallel (:func:`_rows.band_rows`).
    """
    one = x.dtype.type(1)
    n_rows, n = x.shape
    for band in prange(n_bands):
        prefer_wide_vectors()
        e = np.empty((2, n if stream else 0), x.dtype)
        block = np.empty(BLOCK if stream else 0, x.dtype)
        first, stop = band_rows(band, n_bands, n_rows)
        r = one
        for i in range(first, stop):
            row, o = x[i], out[i]
            _, m = max_and_shift(row)
            ahead = x[min(i + 1, stop - 1)]
            if not stream:
                s = exp_total(row, m, t, o, ahead)
            elif i == first:
                s = exp_total(row, m, t, e[i % 2], ahead)
            else:
                s = exp_total(row, m, t, e[i % 2], ahead, (out[i - 1], e[(i - 1) % 2], r, block))
            s = x.dtype.type(s)
            # One division and C products: a vector division does not pipeline,
            # and the extra rounding stays within the few the tolerances allow.
            r = one / (one if s == 0 else s)
            if not stream:
                for j in range(n):
                    o[j] = o[j] * r
        if stream and stop > first:
            stream_row(out[stop - 1], scaled, (e[(stop - 1) % 2], r), block)
            store_fence()


@njit
def _log_entry(j, row, m, t, lowest, lse):
    return shifted(row[j], m, t, lowest) - lse


@njit(parallel=True, cache=True)
def log_softmax(x, t, lowest, out, stream, n_bands):
    """``_maths.log_softmax`` without a mask: z - log1p(Σ_{z<0} e^z + n_top - 1)."""
    n_rows, n = x.shape
    for band in prange(n_bands):
        prefer_wide_vectors()
        block = np.empty(BLOCK if stream else 0, x.dtype)
        first, stop = band_rows(band, n_bands, n_rows)
        for i in range(first, stop):
            row, o = x[i], out[i]
            _, m = max_and_shift(row)
            below, n_top = sum_exp(row, m, t, lowest, None, x[min(i + 1, stop - 1)])
            lse = math.log1p(below + (n_top - 1.0))
            lse = x.dtype.type(0.0 if lse == -np.inf else lse)
            if stream:
                stream_row(o, _log_entry, (row, m, t, lowest, lse), block)
            else:
                for j in range(n):
                    o[j] = _log_entry(j, row, m, t, lowest, lse)
        if stream:
            store_fence()


@njit
def _shifted_product(j, y, dy, d_top):
    return (dy[j] - d_top) * y[j]


@njit
def _vjp_entry(j, y, dy, d_top, total):
    return y[j] * ((dy[j] - d_top) - total)


@njit(fastmath=_REDUCE)
def _vjp_total(yr, dyr, d_top, ahead, behind=None):
    """Σ (dy - d_top) y over the row: ``blocked_sum(_shifted_product, ...)``,
    its blocks and its order, while prefetching ``ahead`` (the next row).

    ``behind``: None, or the previous row's ``(o, y, dy, d_top, total,
    scratch)``, whose output o is written with streaming stores a block per
    block, as ``_rows.exp_total``'s ``behind``: the stores overlap this
    row's reads from memory. The entries of o that ``_rows.stream_plan``
    leaves out are written after the sum, with ordinary stores. Streamed or
    not, a row's total is summed by this one function, so that both write
    the same output.
    """
    prefer_wide_vectors()
    zero = yr.dtype.type(0)
    n = yr.shape[0]
    n_blocks = n // BLOCK
    head = streamed = 0
    if behind is not None:
        o, y_behind, dy_behind, d_behind, t_behind, scratch = behind
        head, streamed = stream_plan(o)
    total = 0.0
    for b in range(n_blocks):
        prefetch_block(ahead, b * BLOCK)
        acc = zero
        for k in range(BLOCK):
            acc += _shifted_product(b * BLOCK + k, yr, dyr, d_top)
        total += acc
        if behind is not None:
            if b < streamed:
                stream_block_of(o, head, b, _vjp_entry, (y_behind, dy_behind, d_behind, t_behind), scratch)
    acc = zero
    for j in range(n_blocks * BLOCK, n):
        acc += _shifted_product(j, yr, dyr, d_top)
    if behind is not None:
        write_unstreamed(o, head, streamed, _vjp_entry, (y_behind, dy_behind, d_behind, t_behind))
    return total + acc


@njit(parallel=True, cache=True)
def softmax_vjp(y, dy, out, stream, n_bands):
    """``_maths.softmax_vjp``: y (d - Σ d y) with d = dy - dy[argmax y].

    Streamed, row i is written during row i + 1's sum
    (:func:`_vjp_total`), the band's last row after it.
    """
    zero = y.dtype.type(0)
    n_rows, n = y.shape
    for band in prange(n_bands):
        prefer_wide_vectors()
        block = np.empty(BLOCK if stream else 0, y.dtype)
        first, stop = band_rows(band, n_bands, n_rows)
        d_top = total = zero
        for i in range(first, stop):
            yr, dyr, o = y[i], dy[i], out[i]
            d_behind, t_behind = d_top, total
            d_top = dyr[first_argmax(yr)]
            ahead = y[min(i + 1, stop - 1)]
            if stream and i > first:
                behind = (out[i - 1], y[i - 1], dy[i - 1], d_behind, t_behind, block)
                total = y.dtype.type(_vjp_total(yr, dyr, d_top, ahead, behind))
            else:
                total = y.dtype.type(_vjp_total(yr, dyr, d_top, ahead))
            if not stream:
                for j in range(n):
                    o[j] = _vjp_entry(j, yr, dyr, d_top, total)
        if stream and stop > first:
            stream_row(out[stop - 1], _vjp_entry, (y[stop - 1], dy[stop - 1], d_top, total), block)
            store_fence()


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
        prefer_wide_vectors()
        lr, gr, o = logp[i], g[i], out[i]
        n = lr.shape[0]
        total = g.dtype.type(blocked_sum(_present, n, zero, (lr, gr)))
        for j in range(n):
            o[j] = zero if lr[j] == -np.inf else gr[j] - exp(lr[j]) * total
        top = first_argmax(lr)
        # a NaN at the argmax (first_argmax's 0 for a row with a NaN) stays NaN
        o[top] = lr[top] if lr[top] != lr[top] else -blocked_sum(_except, n, zero, (o, top))


@njit(error_model="numpy")
def _jacobian_entry(j, y, i, y_i, t):
    # y_i (delta_ij - y_j): -(y_i y_j) off the diagonal, exactly
    v = y_i * ((y.dtype.type(1) if j == i else y.dtype.type(0)) - y[j])
    return v if t is None else v / t


@njit(inline="always")
def _jacobian_piece(yr, i, start, count, t, scratch, at):
    """``scratch[at + m]`` = entry ``start + m`` of an output row (n, i) for m < ``count``; ``yr`` is y[n].

    Both arrays are indexed through views that begin at ``start`` and ``at``:
    every index is then a loop counter from 0, which LLVM knows is not
    negative. Indexed as ``start + m`` it could not rule out Python's
    wrap-around of a negative index, and the loop became gathers that took
    3x as long (the whole Jacobian at C = 511: 75 instead of 25 ms).
    """
    seg, dst, y_i = yr[start:], scratch[at:], yr[i]
    for m in range(count):
        dst[m] = _jacobian_entry(m, seg, i - start, y_i, t)


# Rows shorter than this are written with ordinary stores even when the
# output is streamed: a row's own work (its index, its lines' bounds) then
# costs more than the stores save. A 1 GiB Jacobian, ms, streamed /
# ordinary: C = 32 float32 (128 bytes) 103 / 96, 48 (192) 76 / 76,
# 64 (256) 56 / 81; float64 C = 16 (128) 101 / 94, 32 (256) 56 / 83.
_SPANNED_ROW = 4 * _LINE


@njit(inline="always")
def _stream_jacobian_row(y, t, flat, base, k, first, stop, scratch):
    """Output row k = (n, i), ``flat[k C : (k + 1) C]``, in a band of rows [first, stop).

    Rows of C entries share 64-byte lines with their neighbours unless C
    fills whole lines, and the ordinary stores of a shared line among
    streamed ones made the Jacobian at C = 511 or 496 take 3.5x as long as
    at 512. So each row streams the lines that begin in it: from its first
    boundary up to the next row's first boundary, taking the next row's
    first entries along. Only the lines at the band's ends, which another
    thread's row shares, get ordinary stores: the first row's entries
    before its first boundary and the last row's after its last one.
    The entries go through ``scratch`` (BLOCK + a line) a block at a time.
    """
    n_classes = y.shape[1]
    itemsize = y.itemsize
    n, i = k // n_classes, k % n_classes
    yr = y[n]
    row = k * n_classes
    end = row + n_classes
    head = to_boundary(base, row, itemsize)
    if k == first:
        o = flat[row:]
        for j in range(head):
            o[j] = _jacobian_entry(j, yr, i, yr[i], t)
    if k + 1 < stop:
        last = end + to_boundary(base, end, itemsize)
    else:
        last = end - (_LINE // itemsize - to_boundary(base, end, itemsize)) % (_LINE // itemsize)
        o = flat[last:end]
        tail = last - row
        for j in range(end - last):
            o[j] = _jacobian_entry(tail + j, yr, i, yr[i], t)
    own = min(last, end) - row - head
    for chunk in range(0, own, BLOCK):
        size = min(BLOCK, own - chunk)
        _jacobian_piece(yr, i, head + chunk, size, t, scratch, 0)
        if chunk + size == own and last > end:
            m, h = (k + 1) // n_classes, (k + 1) % n_classes
            _jacobian_piece(y[m], h, 0, last - end, t, scratch, size)
            size += last - end
        stream_span(scratch, flat, row + head + chunk, size)


@njit(parallel=True, cache=True)
def softmax_jacobian(y, t, out, stream, n_bands):
    """``_maths.softmax_jacobian``: out[n, i, j] = y_i (delta_ij - y_j) / t.

    The bands split the N·C output rows, one per (n, i). Streamed (where a
    row holds ``_SPANNED_ROW`` bytes or more and ``out`` lies on its
    entries' alignment), a row's entries are computed on their own
    (``_jacobian_entry``) and the lines that begin in it streamed
    (:func:`_stream_jacobian_row`); otherwise the row is filled with
    -(y_i y_j) and its diagonal set after, which vectorises.
    """
    n_rows, n_classes = y.shape
    n_out = n_rows * n_classes
    one = y.dtype.type(1)
    flat = out.reshape(n_out * n_classes)
    base = address(out)
    lines = stream and n_classes * y.itemsize >= _SPANNED_ROW and base % y.itemsize == 0
    for band in prange(n_bands):
        scratch = np.empty(BLOCK + _LINE // y.itemsize if lines else 0, y.dtype)
        first, stop = band_rows(band, n_bands, n_out)
        for k in range(first, stop):
            if lines:
                _stream_jacobian_row(y, t, flat, base, k, first, stop, scratch)
                continue
            n, i = k // n_classes, k % n_classes
            yr, o = y[n], out[n, i]
            y_i = yr[i]
            for j in range(n_classes):
                o[j] = -(y_i * yr[j])
            o[i] = y_i * (one - y_i)
            if t is not None:
                for j in range(n_classes):
                    o[j] = o[j] / t
        if lines:
            store_fence()
