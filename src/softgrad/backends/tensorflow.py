"""The TensorFlow backend: primitives from TensorFlow ops, and custom gradients.

This module is imported only once TensorFlow is already in ``sys.modules``.
The three cores (softmax, log-softmax, log-sum-exp of shifted logits) and the
cross-entropy sum carry ``tf.custom_gradient`` whose gradient functions are
the closed forms of ``softgrad._maths``; everything else is composed of them
and of plain TensorFlow ops. The gradient functions are themselves written in
differentiable ops, so a tape of a tape gives second derivatives.
"""

import contextlib

import tensorflow as tf

from .. import _maths
from . import tensorflow_fused as fused
from ._base import Backend
from .numpy import NUMPY


class TensorFlowBackend(Backend):
    name = "tensorflow"

    # -- whole operations, compiled with XLA for large inputs ---------------

    def softmax(self, x, temperature, mask):
        if mask is None and isinstance(temperature, float) and fused.applies(x):
            return fused.softmax_family(self, x, temperature, log=False)
        return super().softmax(x, temperature, mask)

    def log_softmax(self, x, temperature, mask):
        if mask is None and isinstance(temperature, float) and fused.applies(x):
            return fused.softmax_family(self, x, temperature, log=True)
        return super().log_softmax(x, temperature, mask)

    def cross_entropy(self, x, tg, *, z_loss, reduction):
        if tg.soft is None and fused.applies(x):
            return fused.cross_entropy(self, x, tg, z_loss, reduction, with_grad=False)
        return super().cross_entropy(x, tg, z_loss=z_loss, reduction=reduction)

    def cross_entropy_with_grad(self, x, tg, *, z_loss, reduction):
        if tg.soft is None and fused.applies(x):
            return fused.cross_entropy(self, x, tg, z_loss, reduction, with_grad=True)
        return super().cross_entropy_with_grad(x, tg, z_loss=z_loss, reduction=reduction)

    def closed_form(self, forward, vjp):
        return _closed_form(forward, vjp)

    # -- conversion ------------------------------------------------------

    def asarray(self, value):
        if isinstance(value, (tf.Tensor, tf.Variable)):
            return tf.convert_to_tensor(value)
        return tf.convert_to_tensor(NUMPY.asarray(value))

    def as_labels(self, value):
        return tf.convert_to_tensor(value)

    def dtype_name(self, a):
        return a.dtype.name

    def dtype_kind(self, a):
        d = a.dtype
        if d.is_bool:
            return "b"
        if d.is_complex:
            return "c"
        if d.is_floating:
            return "f"
        return "i" if d.is_integer else "?"

    def cast(self, a, dtype_name):
        return tf.cast(a, dtype_name)

    def cast_to(self, a, dtype):
        return tf.cast(self.asarray(a) if not isinstance(a, tf.Tensor) else a, dtype)

    def cast_like(self, a, like):
        return tf.cast(a, like.dtype)

    def shape(self, a):
        return tuple(a.shape.as_list())

    def moveaxis(self, a, source, destination):
        order = list(range(len(a.shape)))
        order.insert(destination % len(order), order.pop(source % len(order)))
        return tf.transpose(a, order)

    def broadcast_like(self, a, like):
        return tf.broadcast_to(a, tf.shape(like))

    def reshape(self, a, shape):
        return tf.reshape(a, [-1 if d is None else d for d in shape])

    def require(self, ok, message, values):
        """Raise now when the values are known; otherwise add a graph assertion.

        Under XLA (jit_compile=True) TensorFlow drops assertions.
        """
        if tf.executing_eagerly():
            NUMPY.require(ok.numpy(), message, values.numpy())
            return
        tf.debugging.Assert(
            tf.reduce_all(ok),
            [message("an entry listed below"), values],
            summarize=20,
        )

    def quiet(self):
        return contextlib.nullcontext()

    # -- elementwise -------------------------------------------------------

    exp = staticmethod(tf.exp)
    log1p = staticmethod(tf.math.log1p)
    expm1 = staticmethod(tf.math.expm1)
    square = staticmethod(tf.square)
    where = staticmethod(tf.where)
    logical_and = staticmethod(tf.logical_and)
    zeros_like = staticmethod(tf.zeros_like)
    ones_like = staticmethod(tf.ones_like)
    expand_dims = staticmethod(tf.expand_dims)
    stop_gradient = staticmethod(tf.stop_gradient)

    def saturate(self, a):
        """Clip from below at the most negative finite float, NaN kept.

        The gradient passes straight through: the clipped value stands for
        the unrepresentable logit, whose derivative is that of the identity.
        """

        @tf.custom_gradient
        def saturate(a):
            low = tf.constant(a.dtype.min, a.dtype)
            clipped = tf.where(a < low, low, a)
            return clipped, lambda d: d

        return saturate(a)

    def saturate_to(self, a, dtype_name):
        """Clip finite values into the range of ``dtype_name``; inf and NaN
        kept, and the gradient passes straight through as in :meth:`saturate`."""
        big = tf.constant(tf.as_dtype(dtype_name).max, a.dtype)

        @tf.custom_gradient
        def saturate_to(a):
            inside = tf.where(a > big, big, tf.where(a < -big, -big, a))
            return tf.where(tf.math.is_inf(a), a, inside), lambda d: d

        return saturate_to(a)

    # -- rows --------------------------------------------------------------

    def rowsum(self, a):
        return tf.reduce_sum(a, axis=-1, keepdims=True)

    def rowmax(self, a):
        return tf.reduce_max(a, axis=-1, keepdims=True)

    def argmax_index(self, a):
        if a.shape[-1] == 0:
            return tf.zeros(tf.concat([tf.shape(a)[:-1], [1]], 0), tf.int32)
        return tf.expand_dims(tf.argmax(a, axis=-1, output_type=tf.int32), -1)

    def take(self, v, index):
        if v.shape[-1] == 0:
            return tf.zeros(tf.concat([tf.shape(v)[:-1], [1]], 0), v.dtype)
        return tf.gather(v, index, axis=-1, batch_dims=len(v.shape) - 1)

    def rowsum_except(self, a, index):
        return fused.sum_except(a, index) if fused.in_xla() else super().rowsum_except(a, index)

    def add_at(self, a, index, value):
        return self._at(tf.tensor_scatter_nd_add, a, index, value)

    def put_at(self, a, index, value):
        return self._at(tf.tensor_scatter_nd_update, a, index, value)

    def _at(self, scatter, a, index, value):
        """Scatter one value per row at a per-row index (..., 1); unlike a
        one-hot row, this costs nothing per entry. With no class there is
        no entry to set."""
        if a.shape[-1] == 0:
            return a
        rows = tf.reshape(index, [-1])
        coords = tf.stack([tf.range(tf.size(rows), dtype=rows.dtype), rows], -1)
        values = tf.reshape(tf.broadcast_to(tf.cast(value, a.dtype), tf.shape(index)), [-1])
        return tf.reshape(scatter(tf.reshape(a, [-1, tf.shape(a)[-1]]), coords, values), tf.shape(a))

    def lookup(self, table, index):
        return tf.gather(table, index)

    def index_mask(self, index, like):
        return tf.equal(tf.range(tf.shape(like)[-1], dtype=index.dtype), index)

    def eye_like(self, y):
        return tf.eye(tf.shape(y)[-1], dtype=y.dtype)

    def one_hot(self, labels, n_classes, dtype):
        return tf.one_hot(labels, n_classes, dtype=dtype)

    def ones_bool(self, labels):
        return tf.ones_like(labels, dtype=tf.bool)

    def count_rows(self, y):
        return tf.reduce_prod(tf.shape(y)[:-1])

    def total(self, a):
        return tf.reduce_sum(a)

    # -- the cores, with closed-form gradients -----------------------------

    def softmax_core(self, z):
        def forward(z):
            return _maths.softmax_body(self, z), self.argmax_index(z)

        def vjp(y, top, dy):
            return _maths.softmax_vjp(self, y, dy, top)

        return _closed_form(forward, vjp)(z)

    def log_softmax_core(self, z):
        def forward(z):
            return _maths.log_softmax_body(self, z), self.argmax_index(z)

        def vjp(logp, top, dlogp):
            return _maths.log_softmax_vjp(self, logp, dlogp, top)

        return _closed_form(forward, vjp)(z)

    def logsumexp_core(self, z):
        def forward(z):
            return _maths.logsumexp_body(self, z), z

        def vjp(lse, z, dlse):
            # d lse / dz = softmax(z); a row with no entry has gradient 0.
            safe = tf.where(lse == _maths.NEG_INF, tf.zeros_like(lse), lse)
            return dlse * tf.exp(z - safe)

        return _closed_form(forward, vjp)(z)

    def xent_core(self, z, q):
        def forward(z, q):
            return _maths.xent_body(self, z, q), (z, q)

        def vjp(outputs, saved, dloss, dlse):
            _, lse = outputs
            z, q = saved
            safe = tf.where(lse == _maths.NEG_INF, tf.zeros_like(lse), lse)
            dloss = tf.expand_dims(dloss, -1)
            dz = dloss * _maths.xent_grad(self, z, lse, q) + dlse * tf.exp(z - safe)
            # d/dq = -log p is +inf for an absent class; where no gradient
            # flows in, keep it 0 rather than 0 * inf.
            dq = tf.where(dloss == 0, tf.zeros_like(z), -dloss * (z - safe))
            return dz, dq

        return _closed_form(forward, vjp)(z, q)

def _closed_form(forward, vjp):
    """An op whose gradient is a closed form, differentiable in turn.

    ``forward(*inputs)`` returns ``(outputs, saved)``; the gradient is
    ``vjp(outputs, saved, *output_gradients)``. The rule is given the op's own
    outputs rather than the tensors inside ``forward``, so differentiating
    the gradient again goes through this rule too instead of through
    autodiff of the forward body (whose log1p form is exact in value but not
    in autodiff). ``saved`` holds what else the rule needs, such as the
    index of each row's max.
    """

    def op(*inputs):
        result = []

        @tf.custom_gradient
        def f(*inputs):
            outputs, saved = forward(*inputs)

            def grad(*output_gradients):
                if not result:
                    # Forward-mode autodiff calls the rule while the op is
                    # being built, before its outputs exist.
                    raise NotImplementedError(
                        "softgrad's TensorFlow gradients support tf.GradientTape (reverse mode), "
                        "not tf.autodiff.ForwardAccumulator; for J @ v use softgrad.softmax_jvp "
                        "or softgrad.log_softmax_jvp"
                    )
                grads = [
                    tf.zeros_like(o) if g is None else g
                    for o, g in zip(tf.nest.flatten(result[0]), output_gradients)
                ]
                return vjp(result[0], saved, *grads)

            return outputs, grad

        result.append(f(*inputs))
        return result[0]

    return op


TENSORFLOW = TensorFlowBackend()
