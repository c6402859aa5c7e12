"""Scalar building blocks that vectorise: exp, a NaN-propagating max, halving.

Without Intel's SVML, numba lowers ``np.exp`` in a loop to a scalar libm call,
which keeps the loop from vectorising and costs more than reading the data.
``exp`` here is branch-free: Cody-Waite reduction ``z = t ln2 + r`` with
``|r| <= ln2/2`` (t rounded by adding a magic number, which also leaves t's
integer in the sum's bits), a Taylor polynomial for ``e^r`` accurate to about
one unit in the last place, and ``2^t`` built from its bits. ``2^t`` is
applied in two halves so that results in the subnormal range round once and
results past the largest float overflow to inf.

These functions are compiled with FMA contraction only. The kernels that call
them may allow reassociation (it lets LLVM vectorise their row sums); the flags
stay per function, so the range reduction here is never re-associated.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_CONSTANTS = {
    np.float32: {
        # outside [lowest, highest] exp is 0 or inf in float32
        "lowest": -104.0,
        "highest": 89.0,
        "log2e": 1.4426950408889634,
        "ln2_hi": 0.693145751953125,  # 16 bits: t * ln2_hi is exact
        "ln2_lo": 1.428606765330187e-06,
    },
    np.float64: {
        "lowest": -746.0,
        "highest": 710.0,
        "log2e": 1.4426950408889634,
        "ln2_hi": 0.6931471803691238,  # 28 bits: t * ln2_hi is exact
        "ln2_lo": 1.9082149292705877e-10,
    },
}


@intrinsic
def _scale(typingctx, p, k, magic):
    """``p * 2^n`` for the integer n that ``k = magic + n`` holds in its low bits.

    ``magic`` is 1.5 * 2^(mantissa bits): adding it to a float of magnitude
    below 2^(mantissa bits - 1) rounds that to an integer n and leaves n in
    the low bits of the sum, so that n is read off by integer subtraction.
    2^n is applied as 2^(n >> 1) * 2^(n - (n >> 1)): each half is a normal
    number over exp's whole range, so a subnormal result rounds once and a
    result past the largest float becomes inf. Integer operations without
    overflow flags: a NaN k gives some finite bits, and p is NaN then.
    """
    if not (p == k == magic and p in (types.float32, types.float64)):
        return None
    width, mantissa_bits, bias = (32, 23, 127) if p == types.float32 else (64, 52, 1023)

    def codegen(context, builder, signature, args):
        integer = ir.IntType(width)
        value, k_value, magic_value = args
        n = builder.sub(builder.bitcast(k_value, integer), builder.bitcast(magic_value, integer))
        low = builder.ashr(n, ir.Constant(integer, 1))
        high = builder.sub(n, low)
        factors = []
        for half_n in (low, high):
            biased = builder.add(half_n, ir.Constant(integer, bias))
            factors.append(builder.bitcast(builder.shl(biased, ir.Constant(integer, mantissa_bits)), value.type))
        return builder.fmul(builder.fmul(value, factors[0]), factors[1])

    return p(p, k, magic), codegen


@intrinsic
def maximum(typingctx, a, b):
    """IEEE ``maximum``: NaN if either argument is NaN (LLVM vectorises it)."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic(
            "llvm.maximum", [ty], ir.FunctionType(ty, [ty, ty])
        )
        return builder.call(fn, args)

    return a(a, b), codegen


def _taylor(dtype, degree):
    return [dtype(1.0 / math.factorial(k)) for k in range(degree + 1)]


def _make_exp(dtype, polynomial):
    c = {k: dtype(v) for k, v in _CONSTANTS[dtype].items()}
    lowest, highest, log2e = c["lowest"], c["highest"], c["log2e"]
    ln2_hi, ln2_lo = c["ln2_hi"], c["ln2_lo"]
    magic = dtype(1.5 * 2.0 ** (np.finfo(dtype).nmant))

    def exp_impl(z):
        # Comparisons with NaN are False, so NaN flows on into the polynomial.
        z = lowest if z < lowest else z
        z = highest if z > highest else z
        # t = round(z / ln2), |t| <= 1075, by the magic-number addition
        k = z * log2e + magic
        t = k - magic
        r = (z - t * ln2_hi) - t * ln2_lo
        return _scale(polynomial(r), k, magic)

    return exp_impl


def _polynomial7(c):
    """Σ c_k r^k, k <= 7, as 1 + (r + r^2 Q(r)) with Q by Estrin's scheme.

    Adding the 1 last leaves one rounding of significance; Estrin's short
    dependency chain keeps the vector units busy (Horner's is 7 FMAs long).
    """
    c0, c1, c2, c3, c4, c5, c6, c7 = c

    @njit(fastmath={"contract"})
    def polynomial(r):
        r2 = r * r
        q = ((c2 + c3 * r) + (c4 + c5 * r) * r2) + (c6 + c7 * r) * (r2 * r2)
        return c0 + (c1 * r + r2 * q)

    return polynomial


def _polynomial13(c):
    """Σ c_k r^k, k <= 13, as in :func:`_polynomial7`."""
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = c

    @njit(fastmath={"contract"})
    def polynomial(r):
        r2 = r * r
        r4 = r2 * r2
        q_low = ((c2 + c3 * r) + (c4 + c5 * r) * r2) + ((c6 + c7 * r) + (c8 + c9 * r) * r2) * r4
        q_high = (c10 + c11 * r) + (c12 + c13 * r) * r2
        return c0 + (c1 * r + r2 * (q_low + q_high * (r4 * r4)))

    return polynomial


def exp(z):
    """``np.exp(z)`` for a float32 or float64 scalar; vectorises in compiled loops."""
    return np.exp(z)


def half(x):
    """``x / 2`` in x's own dtype (a bare 0.5 would promote float32 to float64)."""
    return x * 0.5


@overload(half)
def _half_typed(x):
    factor = {types.float32: np.float32(0.5), types.float64: 0.5}.get(x)
    if factor is None:
        return None
    return lambda x: x * factor


# Truncation after degree 7 (13) leaves r^8/8! < u/10 (r^14/14! < u/30) for |r| <= ln2/2.
_EXP_IMPLS = {
    types.float32: _make_exp(np.float32, _polynomial7(_taylor(np.float32, 7))),
    types.float64: _make_exp(np.float64, _polynomial13(_taylor(np.float64, 13))),
}


@overload(exp, jit_options={"fastmath": {"contract"}})
def _exp_typed(z):
    return _EXP_IMPLS.get(z)


@intrinsic
def prefetch(typingctx, a, j):
    """Ask for the cache line of ``a[j]`` to be brought into L2, without waiting for it."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        # read, moderate temporal locality (L2), data cache
        builder.call(fn, [builder.bitcast(pointer, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(a, j), codegen


# Bytes per vector that ``block_max`` works in: one AVX-512 register, or two
# AVX2 ones where LLVM splits it. Four independent accumulators hide the
# latency of the max (as a loop's reduction chain does not: numba's
# vectorised max loop waits on each step and runs at half the memory speed).
_VECTOR_BYTES = 64
_ACCUMULATORS = 4


def _greater(builder, a, b):
    """Lane-wise ``a if a > b else b``: b where either is NaN, as x86's MAXPS."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def block_max(typingctx, row, start, length):
    """``max(row[start : start + length])``, NaN if any of them is NaN.

    ``length`` must be a compile-time constant multiple of 16 entries (a
    Python int literal, as ``BLOCK``), and the slice must lie in the row,
    which is a contiguous 1-D float32 or float64 array: the entries are
    loaded as vectors without bounds checks. Written as explicit vectors:
    the max of the non-NaN entries through 4 accumulators started at -inf,
    and beside them whether any entry is unordered (NaN).
    """
    if not (isinstance(row, types.Array) and row.dtype in (types.float32, types.float64)
            and isinstance(length, types.IntegerLiteral)):
        return None
    itemsize = 4 if row.dtype == types.float32 else 8
    width = _VECTOR_BYTES // itemsize
    n_vectors, rest = divmod(length.literal_value, width)
    if rest or n_vectors % _ACCUMULATORS:
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        first = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]], wraparound=False)
        element = first.type.pointee
        vector = ir.VectorType(element, width)
        vectors = builder.bitcast(first, vector.as_pointer())
        lowest = ir.Constant(vector, [float("-inf")] * width)
        top = [lowest] * _ACCUMULATORS
        unordered = [ir.Constant(ir.VectorType(ir.IntType(1), width), [0] * width)] * _ACCUMULATORS
        for k in range(n_vectors):
            v = builder.load(builder.gep(vectors, [ir.Constant(ir.IntType(64), k)]), align=itemsize)
            a = k % _ACCUMULATORS
            top[a] = _greater(builder, v, top[a])
            unordered[a] = builder.or_(unordered[a], builder.fcmp_unordered("uno", v, v))
        m = _greater(builder, _greater(builder, top[0], top[1]), _greater(builder, top[2], top[3]))
        nan = builder.or_(builder.or_(unordered[0], unordered[1]), builder.or_(unordered[2], unordered[3]))
        lanes = width
        while lanes > 1:
            lanes //= 2
            halves = [ir.Constant(ir.VectorType(ir.IntType(32), lanes), list(range(s, s + lanes)))
                      for s in (0, lanes)]
            m = _greater(builder, *(builder.shuffle_vector(m, m, h) for h in halves))
        any_nan = builder.icmp_unsigned("!=", builder.bitcast(nan, ir.IntType(width)), ir.Constant(ir.IntType(width), 0))
        largest = builder.extract_element(m, ir.Constant(ir.IntType(32), 0))
        return builder.select(any_nan, ir.Constant(element, float("nan")), largest)

    return row.dtype(row, start, length), codegen


def _float_arrays(src, dst):
    return (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
            and dst.dtype in (types.float32, types.float64))


def _stream_codegen(n_vectors, width):
    """Code for ``dst[start : start + n_vectors * width] = src[:...]``, one
    non-temporal store a vector of ``width`` entries (see :func:`stream_block`)."""

    def codegen(context, builder, signature, args):
        src_type, dst_type = signature.args[0], signature.args[1]
        src_array = context.make_array(src_type)(context, builder, args[0])
        dst_array = context.make_array(dst_type)(context, builder, args[1])
        zero = ir.Constant(ir.IntType(64), 0)
        source = cgutils.get_item_pointer(context, builder, src_type, src_array, [zero], wraparound=False)
        target = cgutils.get_item_pointer(context, builder, dst_type, dst_array, [args[2]], wraparound=False)
        vector = ir.VectorType(source.type.pointee, width)
        source = builder.bitcast(source, vector.as_pointer())
        target = builder.bitcast(target, vector.as_pointer())
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        itemsize = _VECTOR_BYTES // width
        for k in range(n_vectors):
            offset = [ir.Constant(ir.IntType(64), k)]
            v = builder.load(builder.gep(source, offset), align=itemsize)
            store = builder.store(v, builder.gep(target, offset), align=_VECTOR_BYTES)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return codegen


@intrinsic
def stream_block(typingctx, src, dst, start, length):
    """``dst[start : start + length] = src[:length]`` with non-temporal stores.

    Such stores go to memory without first reading the lines they fill
    (an ordinary store reads each line before it writes it), and leave
    them out of the caches: for an output larger than the caches this
    saves a third of the memory traffic of writing it. Follow the stores
    with :func:`store_fence` before any other thread may read ``dst``.

    ``&dst[start]`` must be 64-byte aligned (the stores fault otherwise);
    ``length`` a literal multiple of 16; both arrays contiguous 1-D of one
    float dtype, ``src`` holding at least ``length`` entries. No bounds
    checks.
    """
    if not (_float_arrays(src, dst) and isinstance(length, types.IntegerLiteral)):
        return None
    width = _VECTOR_BYTES // (4 if dst.dtype == types.float32 else 8)
    n_vectors, rest = divmod(length.literal_value, width)
    if rest:
        return None
    return types.none(src, dst, start, length), _stream_codegen(n_vectors, width)


@intrinsic
def stream_line(typingctx, src, dst, start):
    """:func:`stream_block` of one 64-byte line: 16 float32 or 8 float64 entries."""
    if not _float_arrays(src, dst):
        return None
    return types.none(src, dst, start), _stream_codegen(1, _VECTOR_BYTES // (4 if dst.dtype == types.float32 else 8))


@intrinsic
def store_fence(typingctx):
    """Orders the non-temporal stores before it ahead of every later store.

    SFENCE on x86, where a full fence (MFENCE) would also wait for them to
    reach memory: that costs a third of a streamed row's time. Elsewhere a
    sequentially consistent fence.
    """

    def codegen(context, builder, signature, args):
        if builder.module.triple.startswith(("x86_64", "i386", "i686")):
            fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence", (), ir.FunctionType(ir.VoidType(), ()))
            builder.call(fn, ())
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def nonnegative(typingctx, j):
    """``j``, which LLVM may assume is not negative (``llvm.assume``).

    numba's ``a[j]`` wraps a negative signed ``j`` around (adds the length):
    where LLVM cannot rule out a negative index, as for ``start + k``
    (numba's additions may overflow, as far as LLVM knows), that select
    stays in the loop, which then vectorises into gathers or not at all.
    The caller guarantees ``j >= 0``; a negative one is undefined behaviour.
    """
    if not isinstance(j, types.Integer) or not j.signed:
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.assume", (), ir.FunctionType(ir.VoidType(), (ir.IntType(1),)))
        builder.call(fn, (builder.icmp_signed(">=", args[0], ir.Constant(args[0].type, 0)),))
        return args[0]

    return j(j), codegen


@intrinsic
def address(typingctx, a):
    """The address of ``a``'s first entry, as an integer."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(array.data, ir.IntType(64))

    return types.intp(a), codegen



_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Let LLVM vectorise the function that calls this with 512-bit vectors.

    LLVM tunes most x86 CPUs with AVX-512 to prefer 256-bit vectors: older
    ones slow their clock for the wider units, which costs code that runs a
    vector loop only now and then. The loops over a long row are all this
    code does: with 512-bit vectors softmax at 1024 x 32768 float32 took
    about 12 instead of 15 ms, cross-entropy with its gradient 17 instead
    of 20. This marks the LLVM function being compiled, the caller, with
    LLVM's ``"prefer-vector-width"="512"`` attribute; on a CPU without
    512-bit vectors it changes nothing.

    The preference belongs to the function that holds a loop once LLVM has
    inlined, so every function of the long-row kernels calls this first
    (a prange kernel first thing in its prange body, which becomes a
    function of its own), and so do the helpers they share (not
    ``inline="always"`` ones, whose code numba puts into the caller). The
    short-row kernels (``_short.py``) and the helpers they use do not:
    their loops run over a few entries between scalar per-row work, and
    there 512-bit vectors were 5-15% slower. ``_rows.row_max`` and
    ``first_argmax`` serve both: their blocks are explicit vectors
    (:func:`block_max`), their tail loops are a short row's whole work.
    Nor does the explicit Jacobian, which only writes memory: 7% slower
    with them.
    """

    def codegen(context, builder, signature, args):
        # llvmlite's attribute set takes only the attributes it knows and
        # writes each as it is: the string attribute is added as a set item.
        set.add(builder.function.attributes, _WIDE)
        return context.get_dummy_value()

    return types.none(), codegen
