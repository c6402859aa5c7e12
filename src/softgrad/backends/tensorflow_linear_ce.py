"""The TensorFlow driver of the linear cross-entropy: chunk loops under XLA.

Imported only when TensorFlow tensors are passed (``softgrad.linear_cross_entropy``
imports it lazily). The loss carries a ``tf.custom_gradient``.

Recompute, not gradients-in-forward. The gradient block of a chunk,
G_k = dloss/dlogits_k, needs the final log-sum-exp of every row, which is
known only after the last chunk. So either way each chunk's logits are
computed twice (a pass for the log-sum-exp, a pass for G_k): four N*D*V
matrix products in all. Computing the gradients in the forward pass would
then keep dW (D*V values, as big as the weight: 32 MiB at D=256, V=32768,
float32) and dh (N*D) alive from the forward to the backward pass, through
the whole backward pass of the rest of a model; it would also be wasted on
evaluation, and could not serve reduction="none", whose upstream gradient
weighs every row differently. Recomputing keeps as residuals only two
numbers per row (the max and log1p of the rest), N*8 bytes.

Why XLA. Every chunk writes a D x B block of columns of dW. An XLA while
loop updates its loop-carried dW buffer in place, so dW exists once; plain
TensorFlow would either copy the whole buffer at each update or collect the
blocks and transpose them into place at the end, holding dW twice. The loops
therefore always run as ``tf.function(jit_compile=True)``, which also works
when called eagerly or from a graph, and is inlined into an enclosing
``jit_compile=True`` function. XLA wants static shapes, so every chunk has
the same width B: chunk 0 covers columns [0, B) but owns only the first
R = V - (K - 1) B of them (its other columns are masked out and later
overwritten), chunk k >= 1 covers [R + (k - 1) B, R + k B).
"""

import math

import numpy as np
import tensorflow as tf

from .. import _linear_maths as lm


class _TensorFlowOps:
    exp = staticmethod(tf.exp)
    log1p = staticmethod(tf.math.log1p)
    expm1 = staticmethod(tf.math.expm1)
    tanh = staticmethod(tf.tanh)
    abs = staticmethod(tf.abs)
    where = staticmethod(tf.where)
    maximum = staticmethod(tf.maximum)
    zeros_like = staticmethod(tf.zeros_like)

    @staticmethod
    def cast_like(a, like):
        return tf.cast(a, like.dtype)

    @staticmethod
    def rowmax(a):
        return tf.reduce_max(a, axis=-1)

    @staticmethod
    def rowsum(a):
        return tf.reduce_sum(a, axis=-1)

    @staticmethod
    def take_at(x, local, in_chunk):
        width = x.shape[-1]
        picked = tf.gather(x, tf.clip_by_value(local, 0, width - 1), batch_dims=1)
        return tf.where(in_chunk, picked, tf.zeros_like(picked))

    @staticmethod
    def put_at(g, local, in_chunk, values):
        width = g.shape[-1]
        at = tf.logical_and(tf.range(width)[None, :] == local[:, None], in_chunk[:, None])
        return tf.where(at, values[:, None], g)


_TF = _TensorFlowOps()


class _Plan:
    """Static chunk layout (see the module docstring) and the options the loops need.

    ``tf.function`` keys its traces by its Python arguments, so the plan
    travels as the hashable tuple ``key`` and equal layouts share one
    compilation.
    """

    def __init__(self, n_classes, width, softcap, label_smoothing, z_loss):
        self.key = (n_classes, width, softcap, label_smoothing, z_loss)
        self.n_classes = n_classes
        self.width = width
        self.count = math.ceil(n_classes / width)
        self.first = n_classes - (self.count - 1) * width
        # dW is updated in rows of `block` columns: every chunk start and
        # width is a multiple of it, so a chunk is a set of whole rows of
        # dW viewed as (D * V / block, block).
        self.block = math.gcd(width, n_classes)
        self.softcap = softcap
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    @classmethod
    def of(cls, call):
        return cls(call.n_classes, call.chunk_size, call.softcap, call.label_smoothing, call.z_loss)

    def start(self, k):
        return tf.maximum(0, self.first + (k - 1) * self.width)

    def owned(self, k):
        """Columns of chunk k that it owns (all but chunk 0's tail), and how many."""
        limit = tf.where(k == 0, self.first, self.width)
        return tf.range(self.width) < limit, limit


def _compute_dtype(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def _chunk_logits(plan, h, w, b, start):
    w_k = tf.cast(tf.slice(w, [0, start], [w.shape[0], plan.width]), h.dtype)
    u = tf.matmul(h, w_k)
    if b is not None:
        u = u + tf.cast(tf.slice(b, [start], [plan.width]), h.dtype)
    x, scaled = lm.capped(_TF, u, plan.softcap)
    return x, scaled, w_k


@tf.function(jit_compile=True, autograph=False)
def _forward(h, w, b, t, plan_key):
    """Pass 1: per-row loss, max and log1p(rest) over the whole vocabulary."""
    plan = _Plan(*plan_key)
    n = tf.shape(h)[0]
    neg_inf = tf.fill([n], tf.constant(-np.inf, h.dtype))

    def body(k, m, r, x_t, sum_x):
        start = plan.start(k)
        x, _, _ = _chunk_logits(plan, h, w, b, start)
        owned, limit = plan.owned(k)
        x = tf.where(owned, x, tf.constant(-np.inf, h.dtype))
        m, r = lm.merge(_TF, m, r, *lm.chunk_rest(_TF, x))
        local = t - start
        x_t = x_t + _TF.take_at(x, local, tf.logical_and(local >= 0, local < limit))
        if plan.label_smoothing:
            sum_x = sum_x + tf.reduce_sum(tf.where(owned, x, tf.zeros_like(x)), axis=-1)
        return k + 1, m, r, x_t, sum_x

    zeros = tf.zeros([n], h.dtype)
    _, m, r, x_t, sum_x = tf.while_loop(
        lambda k, *_: k < plan.count,
        body,
        (tf.constant(0), neg_inf, zeros - 1.0, zeros, zeros),
        maximum_iterations=plan.count,
    )
    loss, log_z = lm.row_loss(_TF, m, r, x_t, sum_x, plan.n_classes, plan.label_smoothing, plan.z_loss)
    return loss, m, log_z


@tf.function(jit_compile=True, autograph=False)
def _backward(h, w, b, t, m, log_z, coef, plan_key):
    """Pass 2: recompute each chunk and accumulate dh, dW and db (float32 or wider)."""
    plan = _Plan(*plan_key)
    n_features, blk = w.shape[0], plan.block
    rows_per_chunk = plan.width // blk
    per_feature = plan.n_classes // blk
    # Rows of the (D * V / blk, blk) view of dW that chunk k's block fills.
    rows_at_zero = (np.arange(n_features)[:, None] * per_feature + np.arange(rows_per_chunk)).reshape(-1, 1)
    rows_at_zero = tf.constant(rows_at_zero, tf.int32)

    def body(k, dh, dw, *db):
        start = plan.start(k)
        x, scaled, w_k = _chunk_logits(plan, h, w, b, start)
        owned, limit = plan.owned(k)
        local = t - start
        g = lm.chunk_grad(_TF, x, m, log_z, local, tf.logical_and(local >= 0, local < limit), coef,
                          plan.n_classes, plan.label_smoothing, plan.z_loss)
        g = lm.uncapped_grad(_TF, tf.where(owned, g, tf.zeros_like(g)), scaled)
        dh = dh + tf.matmul(g, w_k, transpose_b=True)
        dw_k = tf.cast(tf.matmul(h, g, transpose_a=True), w.dtype)
        first_row = start // blk
        dw = tf.tensor_scatter_nd_update(dw, rows_at_zero + first_row, tf.reshape(dw_k, [-1, blk]))
        if db:
            db_k = tf.cast(tf.reduce_sum(g, axis=0), b.dtype)
            db = (tf.tensor_scatter_nd_update(db[0], rows_at_zero[:rows_per_chunk] + first_row,
                                              tf.reshape(db_k, [-1, blk])),)
        return (k + 1, dh, dw) + db

    dw = tf.zeros([n_features * per_feature, blk], w.dtype)
    db = () if b is None else (tf.zeros([per_feature, blk], b.dtype),)
    _, dh, dw, *db = tf.while_loop(
        lambda k, *_: k < plan.count,
        body,
        (tf.constant(0), tf.zeros_like(h), dw) + db,
        maximum_iterations=plan.count,
    )
    return dh, tf.reshape(dw, w.shape), tf.reshape(db[0], b.shape) if db else None


def _prepare(call):
    t = tf.cast(call.labels, tf.int32)
    valid = tf.ones_like(t, tf.bool) if call.ignore_index is None else t != call.ignore_index
    return t, valid


def _reduce(call, rows, valid):
    """``(loss, scale)``: the reduced loss and the factor applied to each row."""
    rows = tf.where(valid, rows, tf.zeros_like(rows))
    if call.reduction == "none":
        return rows, tf.ones_like(rows)
    if call.reduction == "sum":
        return tf.reduce_sum(rows), tf.constant(1.0, rows.dtype)
    count = tf.reduce_sum(tf.cast(valid, rows.dtype))
    # A mean over zero targets is 0 with zero gradient (docs: cross-entropy).
    scale = tf.where(count == 0, tf.zeros_like(count), 1.0 / tf.maximum(count, 1.0))
    return tf.reduce_sum(rows) * scale, scale


def loss(call):
    """The reduced loss, with the recomputing custom gradient."""
    key = _Plan.of(call).key
    t, valid = _prepare(call)
    compute = _compute_dtype(call.hidden.dtype)
    valid_f = tf.cast(valid, compute)

    @tf.custom_gradient
    def run(h, w, *bias):
        # The loops are not differentiated: without stop_gradient a tape
        # would ask the compiled loops for their intermediates.
        hc, w, *bias = (tf.stop_gradient(a) for a in (tf.cast(h, compute), w) + bias)
        b = bias[0] if bias else None
        rows, m, log_z = _forward(hc, w, b, t, key)
        value, scale = _reduce(call, rows, valid)

        def grad(upstream):
            coef = tf.cast(upstream, compute) * scale * valid_f
            dh, dw, db = _backward(hc, w, b, t, m, log_z, coef, key)
            return (tf.cast(dh, h.dtype), dw) + (() if b is None else (db,))

        return value, grad

    inputs = (call.hidden, call.weight) + (() if call.bias is None else (call.bias,))
    return call.output(run(*inputs))


def loss_and_grads(call):
    """(loss, dhidden, dweight, dbias) without a tape: the two passes directly."""
    key = _Plan.of(call).key
    t, valid = _prepare(call)
    compute = _compute_dtype(call.hidden.dtype)
    hc = tf.cast(call.hidden, compute)
    rows, m, log_z = _forward(hc, call.weight, call.bias, t, key)
    value, scale = _reduce(call, rows, valid)
    coef = scale * tf.cast(valid, compute)
    dh, dw, db = _backward(hc, call.weight, call.bias, t, m, log_z, coef, key)
    return call.output(value), call.like_hidden(dh), dw, db
