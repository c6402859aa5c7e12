"""Per-row building blocks shared by the kernels.

A row of up to ~100k float32 stays in the core's L2 cache between passes, so
only the first pass over a row reads main memory; the later ones are cheap.
The exponentials of the second pass are the costly compute, and while they
run the next row is prefetched, so that its first pass does not wait either.

Sums are accumulated in blocks of ``BLOCK`` entries in the input dtype, then
in float64 across blocks: the blocks vectorise (a float32 block sum has a few
roundings per lane), the float64 total keeps a 10^5-term sum exact enough.
Reassociation is allowed only in the functions that reduce; the arithmetic
whose rounding matters (the shift, exp) lives in functions compiled without
it, and numba keeps the flags per function.
"""

import numpy as np
from numba import njit

from ._primitives import (
    address,
    block_max,
    exp,
    half,
    maximum,
    nonnegative,
    prefer_wide_vectors,
    prefetch,
    stream_block,
    stream_line,
)

BLOCK = 256
_LINE = 64  # bytes: the alignment ``stream_block`` needs
_REDUCE = {"reassoc", "contract"}


@njit
def row_max(row):
    """max of the row, NaN if the row holds a NaN, -inf if it is empty."""
    n_blocks = row.shape[0] // BLOCK
    m = row.dtype.type(-np.inf)
    for block in range(n_blocks):
        b = block_max(row, block * BLOCK, BLOCK)
        if b != b:
            return b
        # not maximum(m, b): its NaN test sits on the loop's critical path
        m = b if b > m else m
    for j in range(n_blocks * BLOCK, row.shape[0]):
        m = maximum(m, row[j])
    return m


@njit
def max_and_shift(row):
    """(row max, shift m): m is the max, or 0 for a row with no entry (all -inf)."""
    raw = row_max(row)
    return raw, shift_of(raw)


@njit
def shift_of(raw):
    """The shift m for a row whose max is ``raw``: see :func:`max_and_shift`."""
    return type(raw)(0) if raw == -np.inf else raw


# error_model="numpy": t > 0 is validated, and Python's ZeroDivisionError
# check would be a branch in every loop that divides (and a raise that keeps
# the kernels that pass ``shifted`` on as a first-class function from caching).
@njit(error_model="numpy")
def shifted(x, m, t, lowest):
    """z = (x - m) / t saturated at ``lowest``; -inf (absent) stays -inf.

    ``t`` is None for temperature 1. As in ``_maths.shifted_logits``, x - m is
    halved before the division (exactly) and doubled after, so that a T > 1
    brings a difference beyond the float range back into it. A finite x next
    to a huge max must not become -inf, which would mean absent.

    ``lowest`` None: no saturation, for the callers that only exponentiate
    z, where e^-inf = e^lowest = 0 (the softmax). Both tests then compile
    away, a tenth of the softmax's exponential pass.
    """
    if t is None:
        z = x - m
    else:
        z = (half(x) - half(m)) / t
        z = z + z
    if lowest is None:
        return z
    z = lowest if z < lowest else z
    return x if x == -np.inf else z


@njit
def _exp_entry(row, j, m, t, lowest, out):
    """(e^z if z < 0 else 0, 1 if z = 0 else 0) for entry j; e^z stored in ``out``."""
    z = shifted(row[j], m, t, lowest)
    e = exp(z)
    if out is not None:
        out[j] = e
    zero = row.dtype.type(0)
    return (zero, row.dtype.type(1)) if z == 0 else (e, zero)


@njit(fastmath=_REDUCE)
def sum_exp(row, m, t, lowest, out, ahead=None):
    """(Σ_{z<0} e^z, count of z = 0) in float64; stores e^z in ``out`` unless None.

    ``ahead``: the row the caller works on next, prefetched block by block
    while the exponentials keep the core busy (see :func:`prefetch_block`).

    Together they give the log1p form of log-sum-exp (docs/architecture.md).
    The blocks are loops of constant length inside this function: LLVM
    vectorises those, not a block function called in a loop.
    """
    prefer_wide_vectors()
    below = 0.0
    n_top = 0.0
    n_blocks = row.shape[0] // BLOCK
    for block in range(n_blocks):
        prefetch_block(ahead, block * BLOCK)
        b = row.dtype.type(0)
        c = row.dtype.type(0)
        for k in range(BLOCK):
            e, top = _exp_entry(row, block * BLOCK + k, m, t, lowest, out)
            b += e
            c += top
        below += b
        n_top += c
    b = row.dtype.type(0)
    c = row.dtype.type(0)
    for j in range(n_blocks * BLOCK, row.shape[0]):
        e, top = _exp_entry(row, j, m, t, lowest, out)
        b += e
        c += top
    return below + b, n_top + c


@njit(fastmath=_REDUCE)
def exp_total(row, m, t, out, ahead, behind=None):
    """Σ e^z in float64, with e^z stored in ``out``; z unsaturated (``shifted``'s None).

    For the softmax, which needs only the sum: a max entry's e^0 = 1 is
    summed with the rest instead of counted apart as in :func:`sum_exp`,
    whose tie count costs a tenth of the pass. The float32 block sums then
    round relative to a sum near 1 rather than to the part below it, which
    is all the division by it needs. ``ahead`` is prefetched as there.

    ``behind``: None, or the previous row's ``(o, e, r, scratch)``, whose
    output o = e * r is written with streaming stores (:func:`stream_row`)
    a block per block of this row: the stores then overlap the
    exponentials, where a pass of their own would wait on memory (a tenth
    of the softmax's time). The entries of o that :func:`stream_plan`
    leaves out are written after the exponentials, with ordinary stores.
    """
    prefer_wide_vectors()
    total = 0.0
    n_blocks = row.shape[0] // BLOCK
    head = streamed = 0
    if behind is not None:
        o, e_behind, r, scratch = behind
        head, streamed = stream_plan(o)
    for block in range(n_blocks):
        prefetch_block(ahead, block * BLOCK)
        if behind is not None:
            if block < streamed:
                stream_block_of(o, head, block, scaled, (e_behind, r), scratch)
        b = row.dtype.type(0)
        for k in range(BLOCK):
            j = block * BLOCK + k
            e = exp(shifted(row[j], m, t, None))
            out[j] = e
            b += e
        total += b
    b = row.dtype.type(0)
    for j in range(n_blocks * BLOCK, row.shape[0]):
        e = exp(shifted(row[j], m, t, None))
        out[j] = e
        b += e
    if behind is not None:
        write_unstreamed(o, head, streamed, scaled, (e_behind, r))
    return total + b


@njit
def scaled(j, e, r):
    """The softmax's output entry: e^z times 1 / Σ e^z."""
    return e[j] * r


@njit(fastmath=_REDUCE)
def sum_stored(row, m, t, lowest, e):
    """:func:`sum_exp` of a row whose e^z the caller has stored in ``e``.

    For rows shorter than a block (``_short.py``), whose exponentials are
    computed a tile of rows at a time. The sum is taken in the row's dtype
    and the ties are counted from z, as :func:`sum_exp` does for such rows.
    """
    b = row.dtype.type(0)
    c = row.dtype.type(0)
    for j in range(row.shape[0]):
        if shifted(row[j], m, t, lowest) == 0:
            c += 1
        else:
            b += e[j]
    return np.float64(b), np.float64(c)


@njit
def exp_in_place(flat):
    """flat <- e^flat on a contiguous 1-D array: one loop, which vectorises."""
    for k in range(flat.shape[0]):
        flat[k] = exp(flat[k])


@njit
def prefetch_block(ahead, start):
    """Prefetch ``ahead[start : start + BLOCK]`` (clipped to the row); None does nothing.

    A kernel passes the row it will work on next while it computes on the
    current one, which is in cache: the next row's first pass then finds it
    in L2 instead of waiting on main memory, and the two overlap.
    """
    if ahead is not None:
        for j in range(start, min(start + BLOCK, ahead.shape[0]), 64 // ahead.itemsize):
            prefetch(ahead, j)


@njit
def first_argmax(row):
    """The first j with row[j] == max(row); 0 for a row holding a NaN, or empty.

    The max is found block by block (:func:`block_max`), remembering the
    first block that reached it; only that block is searched entry by entry.
    The entries after the last full block (all of a short row) are one
    plain loop.
    """
    n = row.shape[0]
    full = (n // BLOCK) * BLOCK
    m = row.dtype.type(-np.inf)
    where = 0
    for start in range(0, full, BLOCK):
        b = block_max(row, start, BLOCK)
        if b != b:
            return 0
        if b > m:
            m = b
            where = start
    top = -1
    for j in range(full, n):
        if row[j] != row[j]:
            return 0
        if row[j] > m:
            m = row[j]
            top = j
    if top >= 0:
        return top
    for j in range(where, min(where + BLOCK, n)):
        if row[j] == m:
            return j
    return 0


@njit(fastmath=_REDUCE)
def blocked_sum(entry, n, zero, args):
    """Σ_{j<n} entry(j, *args): blocks of BLOCK in ``zero``'s dtype, float64 across."""
    prefer_wide_vectors()
    total = 0.0
    n_blocks = n // BLOCK
    for block in range(n_blocks):
        acc = zero
        for k in range(BLOCK):
            acc += entry(block * BLOCK + k, *args)
        total += acc
    acc = zero
    for j in range(n_blocks * BLOCK, n):
        acc += entry(j, *args)
    return total + acc


@njit(inline="always")
def stream_row(o, entry, args, block):
    """``o[j] = entry(j, *args)`` for every j, streamed past the caches.

    The entries are computed a block at a time into ``block`` (a scratch
    array of BLOCK entries of o's dtype, which stays in L1) and then written
    with non-temporal stores (:func:`stream_block`): nothing reads the
    output's lines first. For outputs larger than the caches. The blocks
    start at the row's first 64-byte boundary (:func:`stream_plan`); the
    entries before it and after the last full block are ordinary stores.
    Call ``store_fence()`` after the last row.
    """
    head, n_streamed = stream_plan(o)
    for b in range(n_streamed):
        stream_block_of(o, head, b, entry, args, block)
    write_unstreamed(o, head, n_streamed, entry, args)


@njit
def stream_plan(o):
    """(head, n): :func:`stream_row` streams ``o[head : head + n * BLOCK]``.

    ``head`` is the number of entries before o's first 64-byte boundary
    (where a row of the output does not start on one: all but one row in
    16 at C = 50257 float32), ``n`` the full blocks after it; (0, 0) for
    an o that ends before its first boundary, or whose entries lie off
    their own alignment (no boundary starts one of them).
    """
    start = address(o)
    head = to_boundary(start, 0, o.itemsize)
    if start % o.itemsize != 0 or head > o.shape[0]:
        return 0, 0
    return head, (o.shape[0] - head) // BLOCK


@njit(inline="always")
def stream_block_of(o, head, b, entry, args, scratch):
    """Streams block b of ``stream_plan(o) = (head, n)``: its entries
    ``entry(j, *args)`` go to ``scratch`` (BLOCK entries), then to o.

    Two copies of one loop: where o starts on a 64-byte boundary (head 0,
    every row of an aligned output with C a multiple of 16) the indices
    are b * BLOCK + k, and LLVM makes a faster loop of that than of
    head + b * BLOCK + k, even for a head of 0 (cross-entropy at 1024x32768
    took 23-25 instead of 16-17 ms with the second loop alone). Part of the
    difference is numba's wrap-around of negative indices, which LLVM
    cannot rule out for head + b * BLOCK + k: marking that index
    :func:`nonnegative` made log-softmax at 1000x50257 (15 rows in 16 off
    a boundary) take 18.7 instead of 23.4 ms, but left cross-entropy's
    loop as slow as it was.
    """
    if head == 0:
        for k in range(BLOCK):
            scratch[k] = entry(b * BLOCK + k, *args)
        stream_block(scratch, o, b * BLOCK, BLOCK)
    else:
        start = head + b * BLOCK
        for k in range(BLOCK):
            scratch[k] = entry(nonnegative(start + k), *args)
        stream_block(scratch, o, start, BLOCK)


@njit(inline="always")
def stream_span(src, dst, start, n):
    """``dst[start : start + n] = src[:n]`` streamed, a block then a line at a time.

    ``&dst[start]`` on a 64-byte boundary and ``n`` a multiple of a line
    (64 bytes), as :func:`stream_block` needs.
    """
    per_line = _LINE // dst.itemsize
    n_blocks = n // BLOCK
    for b in range(n_blocks):
        stream_block(src[b * BLOCK:], dst, start + b * BLOCK, BLOCK)
    for line in range(n_blocks * BLOCK // per_line, n // per_line):
        stream_line(src[line * per_line:], dst, start + line * per_line)


@njit(inline="always")
def to_boundary(base, index, itemsize):
    """Entries from ``index`` to the first 64-byte boundary at or after it,
    in an array of ``itemsize``-byte entries that starts at address ``base``."""
    return (-(base + index * itemsize) % _LINE) // itemsize


@njit(inline="always")
def write_unstreamed(o, head, n, entry, args):
    """``o[j] = entry(j, *args)``, ordinary stores, for the j that
    ``stream_plan(o) = (head, n)`` leaves out."""
    for j in range(head):
        o[j] = entry(j, *args)
    for j in range(head + n * BLOCK, o.shape[0]):
        o[j] = entry(j, *args)


@njit
def band_rows(band, n_bands, n_rows):
    """(first, stop) of the rows of band ``band`` of ``n_bands`` consecutive bands.

    A kernel that streams its output runs its bands in parallel, one a
    thread, and fences once at the end of each: the fence waits for the
    streamed stores to reach memory, and once a row it would cost a third
    of the row's time.
    """
    return band * n_rows // n_bands, (band + 1) * n_rows // n_bands
