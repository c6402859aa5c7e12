"""Whole TensorFlow operations compiled with XLA, for large inputs.

Op by op, the TensorFlow backend takes one pass over the logits per
elementwise operation, where TensorFlow's own softmax is one fused kernel.
For the common cases (no mask, a float temperature, integer labels, a static
shape) the forward and the backward of an operation are each one function
compiled with ``jit_compile=True``, so XLA fuses them into a few passes. The
maths is still that of ``softgrad._maths``, called inside those functions.

Each compiled function depends on Python options (temperature, reduction,
...), so one is made per combination and kept.
"""

import functools
import math

import tensorflow as tf

from .. import _maths

# Below this many elements, running op by op costs little, and compiling
# for every new shape would cost more than it saves.
MIN_ELEMENTS = 1 << 16


def applies(x) -> bool:
    return x.shape.is_fully_defined() and x.shape.num_elements() >= MIN_ELEMENTS


def _compiled(fn):
    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=True)


def softmax_family(xp, x, temperature, log):
    """softmax or log_softmax of ``x`` on the last axis, with closed-form gradients."""
    forward, backward = _softmax_functions(xp, temperature, log)
    return xp.closed_form(forward, backward)(x)


def _argmax_index(x):
    """An argmax of each row, shape (..., 1): see :func:`_row_extremes`."""
    return _row_extremes(x)[1]


def _row_extremes(x, with_min=False):
    """``(max, argmax)`` of each row, both of shape (..., 1), and with
    ``with_min`` a third: whether any entry of x is -inf (a scalar).

    XLA's argmax is a reduction that it does not vectorise, many times
    slower than a max. So the row is laid out as a (block, C / block)
    matrix: a vectorised max down its columns, an argmax over the column
    maxima, then one within the column that holds the row's max, both
    short. One pass over x gives the max and the argmax, where apart they
    would take two. With ties any of the
    maxima may come out, which serves every use here (each is exact for
    any index at the max). A NaN row may point anywhere in it, which only
    its own NaN result sees.
    """
    c = x.shape[-1]
    block = _block_size(c)
    if block is None:
        extremes = (tf.reduce_max(x, axis=-1, keepdims=True),
                    tf.expand_dims(tf.argmax(x, axis=-1, output_type=tf.int32), -1))
    else:
        cols = c // block
        matrix = _blocked(x, block)
        col_max = tf.reduce_max(matrix, axis=-2)
        col = tf.argmax(col_max, axis=-1, output_type=tf.int32)
        column = tf.gather(matrix, col, axis=-1, batch_dims=x.shape.rank - 1)
        row = tf.argmax(column, axis=-1, output_type=tf.int32)
        # The row max is the max of the argmax's column, taken rather than
        # reduced: XLA would turn a max of the column maxima into a pass
        # over x of its own.
        row_max = tf.gather(col_max, tf.expand_dims(col, -1), axis=-1, batch_dims=x.shape.rank - 1)
        extremes = (row_max, tf.expand_dims(row * cols + col, -1))
    if with_min:
        # A min of each row, not of the columns above: XLA runs a row
        # reduction of x beside the max's for next to nothing, where a
        # column one is a pass of its own.
        extremes += (tf.reduce_any(tf.reduce_min(x, axis=-1) == _maths.NEG_INF),)
    return extremes


def _blocked(x, block):
    """x with its last axis laid out as a (block, C / block) matrix."""
    return tf.reshape(x, tf.concat([tf.shape(x)[:-1], [block, x.shape[-1] // block]], 0))


def sum_except(a, index):
    """Each row's sum without its entry at ``index`` (..., 1), for XLA.

    Op by op this is a sum of the row with that entry put to 0. Under XLA,
    putting the entry in place copies an input first, a pass of its own; in
    the layout of :func:`_row_extremes` the columns are summed instead, then
    the column sums but the index's, plus the index's column without it.
    Each term leaves the entry out, so the result has the precision of a
    sum of the others, as the copy has.
    """
    c = a.shape[-1]
    block = _block_size(c)
    if block is None:
        return tf.reduce_sum(_put_zero(a, index), axis=-1, keepdims=True)
    cols = c // block
    matrix = _blocked(a, block)
    row, col = index // cols, index % cols
    col_sums = _put_zero(tf.reduce_sum(matrix, axis=-2), col)
    column = _put_zero(tf.gather(matrix, col[..., 0], axis=-1, batch_dims=a.shape.rank - 1), row)
    return tf.reduce_sum(col_sums, axis=-1, keepdims=True) + tf.reduce_sum(column, axis=-1, keepdims=True)


def _put_zero(a, index):
    """a with 0 at a per-row index (..., 1), as a select against the
    entry's position, which XLA computes in the pass that reads a."""
    return tf.where(tf.range(tf.shape(a)[-1], dtype=index.dtype) == index, tf.zeros((), a.dtype), a)


def _block_size(c):
    """The largest divisor of c from 16 to sqrt(c), or None (then a plain
    argmax); None as well for a class axis that a relaxed trace leaves unknown."""
    if c is None:
        return None
    return max((d for d in range(16, math.isqrt(c) + 1) if c % d == 0), default=None)


@functools.lru_cache(maxsize=None)
def _softmax_functions(xp, temperature, log):
    return _log_softmax_functions(xp, temperature) if log else _softmax_only_functions(xp, temperature)


def _softmax_only_functions(xp, temperature):
    @_compiled
    def by_maths(x):
        # Any index at the max of y anchors the VJP, and an argmax of x is
        # one: found with the row max, it costs the backward a pass less.
        row_max, top = _row_extremes(x)
        return _maths.softmax_unmasked(xp, x, temperature, row_max), top

    def forward(x):
        if temperature == 1.0 and not in_xla():
            return _kernel_softmax(x, lambda x: by_maths(x)[0]), ()
        y, top = by_maths(x)
        return y, (top,)

    def vjp(y, d, top):
        g = _maths.softmax_vjp(xp, y, d, top)
        return g if temperature == 1.0 else g / temperature

    given_top = _compiled(vjp)
    # After TensorFlow's kernel, the anchor is found in the backward, from y.
    finding_top = _compiled(lambda y, d: vjp(y, d, _argmax_index(y)))

    def backward(y, saved, d):
        return given_top(y, d, *saved) if saved else finding_top(y, d)

    return forward, backward


def _kernel_softmax(x, by_maths):
    """softmax of x (T = 1) by TensorFlow's own kernel where it agrees with
    ``by_maths`` (:func:`softgrad._maths.softmax_body`), which it does for
    finite logits: both take the row max off, exponentiate and divide by
    the sum, the kernel in one fused pass.

    Op by op (under XLA ``by_maths`` compiles to the kernel's passes and
    is used as it is), TensorFlow's kernel lets a NaN or +inf
    through without spoiling the rest of its row (a NaN at that entry,
    0 elsewhere), and gives NaN (0 / 0) for a row with no entry. So the
    rows it gets wrong are exactly those that leave a NaN in its output:
    x - max is NaN at a NaN or +inf entry, and in a row with no entry,
    and nowhere else, where every e^(x - max) is at most 1 and the row's
    sum at least 1. One reduction of the output to a number checks that
    (of y, which the kernel has just written: cheaper than one of x,
    2% of the step), and any NaN sends the whole input to ``by_maths``.
    """
    y = tf.nn.softmax(x)
    finite = tf.math.is_finite(tf.reduce_sum(y))
    return tf.cond(finite, lambda: y, lambda: by_maths(x))


def in_xla():
    """Whether the function being traced is compiled by XLA as a whole
    (``jit_compile=True``). Asked of TensorFlow's tracing context; where
    that cannot be read, the answer is no, which is correct, only slower."""
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # pragma: no cover - TensorFlow's internals moved
        return False


def _log_softmax_functions(xp, temperature):
    @_compiled
    def forward(x):
        # The argmax of x, not of z, which is z's argmax as well.
        row_max, top, absent = _row_extremes(x, with_min=True)
        z, m = _maths.shifted_by_max(xp, x, row_max, temperature)
        return _maths.log_softmax_anchored(xp, x, z, m, top, temperature), (top, absent)

    @_compiled
    def backward(logp, saved, d):
        # With no entry absent anywhere, the backward pass reads no logp in
        # its sum: a pass over the input less.
        top, absent = saved
        vjp = _maths.log_softmax_vjp
        g = _unless(absent, lambda o, d: vjp(xp, o, d, top), lambda o, d: vjp(xp, o, d, top, all_present=True))(logp, d)
        return g if temperature == 1.0 else g / temperature

    return forward, backward


def _unless(flag, general, special):
    """``general`` where ``flag`` is true, else ``special``: the same
    function of the same tensors, cheaper where ``flag`` is false.

    Its derivative is that of ``general``, taken with a tape: XLA cannot
    compile the derivative of a ``tf.cond`` whose branches keep tensors.
    """

    @tf.custom_gradient
    def op(*args):
        def grad(*output_gradients):
            with tf.GradientTape() as tape:
                tape.watch(args)
                again = general(*args)
            return tape.gradient(again, args, output_gradients=output_gradients)

        return tf.cond(flag, lambda: general(*args), lambda: special(*args)), grad

    return op


def cross_entropy(xp, x, tg, z_loss, reduction, with_grad):
    """Cross-entropy with integer labels: the loss, or ``(loss, dlogits)``.

    The op's outputs include each row's log-sum-exp, so that differentiating
    its gradient again sees how that depends on the logits.
    """
    compiled_forward, compiled_backward = _cross_entropy_functions(
        xp, tg.ignore_index, tg.label_smoothing, z_loss, reduction, with_grad
    )

    def forward(x, labels, *weight):
        outputs, m = compiled_forward(x, labels, *weight)
        return outputs, (x, labels, weight, m)

    def backward(outputs, saved, *output_gradients):
        x, labels, weight, m = saved
        dx = compiled_backward(x, labels, m, outputs, output_gradients, *weight)
        return (dx, None) + (None,) * len(weight)

    weight = () if tg.weight is None else (tg.weight,)
    outputs = xp.closed_form(forward, backward)(x, tg.labels, *weight)
    return (outputs[0], outputs[1]) if with_grad else outputs[0]


@functools.lru_cache(maxsize=None)
def _cross_entropy_functions(xp, ignore_index, label_smoothing, z_loss, reduction, with_grad):
    def targets(x, labels, weight):
        return _maths.targets(
            xp,
            labels,
            x.shape[-1],
            x.dtype,
            soft=False,
            weight=weight[0] if weight else None,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )

    @_compiled
    def forward(x, labels, *weight):
        tg = targets(x, labels, weight)
        loss, z, m, lse = _maths.cross_entropy_parts(xp, x, tg, z_loss, by_label=True)
        loss = _maths.reduce_loss(xp, loss, tg, reduction)
        if with_grad:
            grad = _maths.by_label(
                xp, lambda z, q: _maths.cross_entropy_grad(xp, z, m, lse, tg, z_loss, reduction, q), x, z, m, tg
            )
            return (loss, grad, lse), m
        return (loss, lse), m

    @_compiled
    def backward(x, labels, m, outputs, output_gradients, *weight):
        tg = targets(x, labels, weight)
        z = _maths.shifted_by(xp, x, m)
        lse = outputs[-1]
        dloss, dlse = output_gradients[0], output_gradients[-1]
        if reduction == "none":
            dloss = tf.expand_dims(dloss, -1)
        finite_lse = tf.where(lse == _maths.NEG_INF, tf.zeros_like(lse), lse)
        if with_grad:
            # d loss / d x, returned already.
            dx = dloss * outputs[1] + dlse * xp.exp(z - finite_lse)
            return dx + _maths.cross_entropy_hvp(xp, x, tg, output_gradients[1], z_loss, reduction)

        def dx(z, q):
            return dloss * _maths.cross_entropy_grad(xp, z, m, lse, tg, z_loss, reduction, q) + dlse * xp.exp(z - finite_lse)

        # The whole cotangent goes through by_label, so that its label entries
        # are put in place once, at the end.
        return _maths.by_label(xp, dx, x, z, m, tg)

    return forward, backward
