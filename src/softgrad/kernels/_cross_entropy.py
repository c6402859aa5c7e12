"""Cross-entropy kernels: per-example loss and, optionally, the gradient.

They mirror ``_maths.cross_entropy_parts`` and ``_maths.cross_entropy_grad``
row by row (docs/derivations.md#cross-entropy). Per example, with
q = (a Y + b) w, S = Σ q and L = log1p(Σ_{z<0} e^z + n_top - 1):

    loss = S L - Σ_{q != 0} q z  +  z_loss (m + L)^2 valid
    grad = ((S + zc) p - q) scale,  zc = 2 z_loss (m + L) valid

with the component at a row max written (S - q) + S (p - 1) + zc p, p - 1
from the sum of the other exponentials, so that a gradient of 1e-17 next to
a probability of one is not rounded to 0; absent entries (-inf) get 0. Both
terms of the loss are >= 0 (z <= 0), so it keeps its relative precision too.

``a`` = 1 - label_smoothing and ``b`` = label_smoothing / C, in the logits'
dtype; ``weight`` is None for no class weights; ``grad`` is None for the
loss alone. Integer labels equal to ``ignore_index`` count as invalid rows
(pass a negative number for none). ``loss`` receives float64 per-example
values; ``grad`` is written in place.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._primitives import prefer_wide_vectors, store_fence, stream_block
from ._rows import (
    BLOCK,
    band_rows,
    blocked_sum,
    max_and_shift,
    shift_of,
    shifted,
    stream_plan,
    stream_row,
    sum_exp,
    sum_stored,
    write_unstreamed,
)


@njit
def _q(j, row, label, soft_row, weight, a, b):
    """q_j = (a y_j + b) w_j in the logits' dtype, rounded as ``_maths.targets`` does."""
    if soft_row is not None:
        y = soft_row[j]
    else:
        y = row.dtype.type(1) if j == label else row.dtype.type(0)
    q = a * y + b
    return q if weight is None else q * weight[j]


@njit
def _qz(j, row, m, lowest, label, soft_row, weight, a, b):
    q = _q(j, row, label, soft_row, weight, a, b)
    return 0.0 if q == 0 else q * np.float64(shifted(row[j], m, None, lowest))


@njit
def _targets(row, m, lowest, label, soft_row, weight, a, b):
    """(Σ q, Σ_{q != 0} q z) over a row."""
    prefer_wide_vectors()
    n = row.shape[0]
    # float64 throughout: S sits next to 1 - p and is not on the fast path.
    s_q = blocked_sum(_q, n, 0.0, (row, label, soft_row, weight, a, b))
    s_qz = blocked_sum(_qz, n, 0.0, (row, m, lowest, label, soft_row, weight, a, b))
    return s_q, s_qz


@njit
def _grad_row(row, top_value, g, e, label, soft_row, weight, a, b, coef, scale, s_q, top_extra, absent, dense,
              block):
    """g <- (coef e - q) scale, with max and absent entries written as above.

    ``e`` holds e^z; it may be ``g`` itself (each entry is read before it is
    written). Without smoothing or soft labels q is one-hot, so only the
    label entry needs q; ``dense`` says whether every entry does. ``block``:
    None, or a scratch block for writing g with streaming stores
    (``_rows.stream_row``).

    A row that does not start on a 64-byte boundary (``stream_plan``'s
    head > 0) has its blocks computed from views that start at each block,
    so that every index is a loop counter from 0: with head + b BLOCK + k
    in the indices, even marked :func:`_primitives.nonnegative`, LLVM made
    a loop twice as slow (cross-entropy at 1000x50257, 15 rows in 16 off
    a boundary: 32 -> 21.5 ms with the views). Aligned rows keep
    ``stream_row``'s loop, which was as fast or faster.
    """
    prefer_wide_vectors()
    q_label = _q(label, row, label, soft_row, weight, a, b)
    args = (row, e, label, q_label, soft_row, weight, a, b, top_value, coef, scale, s_q, top_extra, absent, dense)
    if block is None:
        for j in range(row.shape[0]):
            g[j] = _grad_value(j, *args)
        return
    head, n = stream_plan(g)
    if head == 0:
        stream_row(g, _grad_value, args, block)
        return
    for k in range(n):
        start = head + k * BLOCK
        part = (row[start:], e[start:], label - start, q_label, _from(soft_row, start), _from(weight, start), a, b,
                top_value, coef, scale, s_q, top_extra, absent, dense)
        for j in range(BLOCK):
            block[j] = _grad_value(j, *part)
        stream_block(block, g, start, BLOCK)
    write_unstreamed(g, head, n, _grad_value, args)


def _from(a, start):
    """``a[start:]``, or None for None."""
    return None if a is None else a[start:]


@overload(_from)
def _from_typed(a, start):
    if isinstance(a, types.NoneType):
        return lambda a, start: None
    return lambda a, start: a[start:]


@njit
def _grad_value(j, row, e, label, q_label, soft_row, weight, a, b, top_value, coef, scale, s_q, top_extra, absent,
                dense):
    dtype = row.dtype.type
    if dense:
        q = _q(j, row, label, soft_row, weight, a, b)
    else:
        q = q_label if j == label else dtype(0)
    x = row[j]
    v = dtype(coef) * e[j] - q
    # (S - q) first: for a confident correct row it is exactly 0.
    v = dtype((s_q - q) + top_extra) if x == top_value else v
    v = dtype(absent) if x == -np.inf else v
    return v * dtype(scale)


@njit
def _example(row, g, label, soft_row, weight, a, b, valid, z_loss, scale, lowest, ahead, ready_max, stream=None):
    """The loss of one example; writes its gradient into ``g`` unless None; prefetches ``ahead``.

    ``ready_max``: None, or the row's max, found where ``g`` was filled
    with e^z (``_short.py``): the row's sum is then taken from g instead of
    exponentiating again. ``stream``: None, or ``(e, block)``, scratch for
    the row's e^z and a block: the gradient is then written with streaming
    stores.
    """
    prefer_wide_vectors()
    if ready_max is None:
        raw_max, m = max_and_shift(row)
    else:
        raw_max, m = ready_max, shift_of(ready_max)
    if g is None:
        below, n_top = sum_exp(row, m, None, lowest, None, ahead)
    elif ready_max is not None:
        below, n_top = sum_stored(row, m, None, lowest, g)
    elif stream is not None:
        below, n_top = sum_exp(row, m, None, lowest, stream[0], ahead)
    else:
        below, n_top = sum_exp(row, m, None, lowest, g, ahead)
    e_total = below + n_top
    rest = below + (n_top - 1.0)
    lse = math.log1p(rest)
    lse0 = 0.0 if lse == -np.inf else lse
    dense = soft_row is not None or b != 0
    if dense:
        s_q, s_qz = _targets(row, m, lowest, label, soft_row, weight, a, b)
    else:
        s_q = np.float64(_q(label, row, label, soft_row, weight, a, b))
        s_qz = 0.0 if s_q == 0 else s_q * np.float64(shifted(row[label], m, None, lowest))
    # With S = 0 every q may be 0, and -Σ_{q != 0} q log p is then 0 even
    # for a NaN or empty row.
    loss = -s_qz if s_q == 0 else s_q * lse0 - s_qz
    zc = 0.0
    if z_loss != 0:
        full_lse = np.float64(m) + lse
        loss += z_loss * full_lse * full_lse * valid
        # A row with no entry has p = 0 and gets no z-loss gradient.
        zc = 2.0 * z_loss * (0.0 if full_lse == -np.inf else full_lse) * valid
    if g is not None:
        inv = 1.0 / (e_total if e_total != 0 else 1.0)
        coef = (s_q + zc) * inv
        # At a max entry (z = 0) p = 1 / Σe = 1 / (1 + rest), and
        # S p - q = (S - q) + S (p - 1) with p - 1 = -rest / (1 + rest),
        # which keeps a tiny 1 - p that p - 1 itself would round to 0. With
        # p <= 1/2 (ties) S p - q is better as it is: nothing to cancel.
        top_extra = s_q * (-rest * inv) + zc * inv
        absent = 0.0 if z_loss == 0 else zc * (0.0 * inv)
        confident = math.isfinite(raw_max) and rest < 1.0
        top_value = raw_max if confident else row.dtype.type(np.nan)
        if stream is None:
            _grad_row(row, top_value, g, g, label, soft_row, weight, a, b, coef, scale, s_q, top_extra, absent,
                      dense, None)
        else:
            _grad_row(row, top_value, g, stream[0], label, soft_row, weight, a, b, coef, scale, s_q, top_extra,
                      absent, dense, stream[1])
    return loss


@njit
def label_targets(label, ignore_index, a, b):
    """(label, a, b, valid) of one example: an ignored one has q = 0, which
    label 0 with a = b = 0 gives exactly."""
    if label != ignore_index:
        return label, a, b, 1.0
    return 0, a - a, b - b, 0.0


@njit
def _banded_example(x, grad, i, label, soft_row, weight, a, b, valid, z_loss, scale, lowest, ahead, streaming, e,
                    block):
    """:func:`_example` for row i of a band: the loss alone, or with the
    gradient written with streaming stores (through ``e`` and ``block``) or
    ordinary ones."""
    prefer_wide_vectors()
    if grad is None:
        return _example(x[i], None, label, soft_row, weight, a, b, valid, z_loss, scale, lowest, ahead, None)
    if streaming:
        return _example(x[i], grad[i], label, soft_row, weight, a, b, valid, z_loss, scale, lowest, ahead, None,
                        (e, block))
    return _example(x[i], grad[i], label, soft_row, weight, a, b, valid, z_loss, scale, lowest, ahead, None)


@njit(parallel=True, cache=True)
def with_labels(x, labels, weight, ignore_index, a, b, z_loss, scale, lowest, loss, grad, stream, n_bands):
    """Cross-entropy with integer labels; ``stream`` and ``n_bands`` as in
    ``_softmax.softmax``: each row's e^z go to a scratch row, and the
    gradient is written from it with streaming stores."""
    n_rows, n = x.shape
    streaming = stream and grad is not None
    for band in prange(n_bands):
        prefer_wide_vectors()
        e = np.empty(n if streaming else 0, x.dtype)
        block = np.empty(BLOCK if streaming else 0, x.dtype)
        first, stop = band_rows(band, n_bands, n_rows)
        for i in range(first, stop):
            label, ai, bi, v = label_targets(labels[i], ignore_index, a, b)
            loss[i] = _banded_example(x, grad, i, label, None, weight, ai, bi, v, z_loss, scale, lowest,
                                      x[min(i + 1, stop - 1)], streaming, e, block)
        if streaming:
            store_fence()


@njit(parallel=True, cache=True)
def with_soft_labels(x, soft, weight, a, b, z_loss, scale, lowest, loss, grad, stream, n_bands):
    """Cross-entropy with soft labels (class probabilities); ``stream`` and
    ``n_bands`` as in :func:`with_labels`."""
    n_rows, n = x.shape
    streaming = stream and grad is not None
    for band in prange(n_bands):
        prefer_wide_vectors()
        e = np.empty(n if streaming else 0, x.dtype)
        block = np.empty(BLOCK if streaming else 0, x.dtype)
        first, stop = band_rows(band, n_bands, n_rows)
        for i in range(first, stop):
            loss[i] = _banded_example(x, grad, i, 0, soft[i], weight, a, b, 1.0, z_loss, scale, lowest,
                                      x[min(i + 1, stop - 1)], streaming, e, block)
        if streaming:
            store_fence()
