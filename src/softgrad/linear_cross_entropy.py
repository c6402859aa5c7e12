"""Linear + cross-entropy for huge vocabularies, without the logits.

``linear_cross_entropy(h, W, t)`` equals ``cross_entropy(h @ W + b, t)`` but
walks the vocabulary in column chunks of W with an online log-sum-exp, so at
most one N x chunk block of logits exists at a time: memory O(N*B + D*V)
instead of O(N*V). The maths is in docs/derivations.md#linear-cross-entropy
and, written once for both backends, in ``_linear_maths.py``; this module
holds the public functions, their validation and the NumPy driver.
"""

import math

import numpy as np

from . import _linear_maths as lm
from . import _validate
from ._errors import SoftgradError
from .backends import backend_for

# The default chunk width B comes from a memory budget for the chunk's
# working set: B = budget / (live * N * itemsize), where `live` counts the
# N x B arrays a pass holds at once.
#
# * NumPy without the compiled kernels evaluates the chunk maths one
#   operation at a time, so about five are alive in the gradient pass
#   (logits, shifted logits, probabilities, gradient block, its scaled
#   copy). Its budget is 16 MiB: at N = 4096, float32, B = 128; smaller
#   chunks would cost time in per-operation overhead.
# * NumPy with the kernels (softgrad.kernels, "numba" below) holds one: the
#   matrix product writes the logits into a block reused by every chunk, and
#   the kernels overwrite it in place with the gradient. Next to it the
#   gradient pass holds dW, dh and the N x D product G_k W_k^T. Each chunk
#   costs four BLAS calls and two kernel calls whatever its width, and on a
#   busy machine each BLAS call can wait a scheduler tick (4-8 ms) for its
#   second thread: at N = 1024, D = 128, V = 16384 (4 ms of products per
#   1024 columns on an idle machine) chunks of 2048, 4096, 8192 and 16384
#   columns took 1.84, 1.31, 0.97 and 0.86 times the naive computation's
#   time there in one interleaved run on a busy machine, and 0.88, 0.85,
#   0.87 and 0.98 on an idle one (a block beyond the caches makes the
#   kernels' passes memory-bound). Its budget is therefore
#   32 MiB: B = 2048 at N = 4096 and 8192 at N = 1024, float32, a block of
#   32 MiB next to the 512 MiB of one copy of the logits at N = 4096,
#   V = 32768 (and 3 such arrays held by the naive computation). With a
#   soft-cap the gradient pass holds two blocks (u / s, whose sech^2 the
#   chain rule needs, and the capped logits), so B is halved.
# * XLA fuses the elementwise maths. Its buffer assignment (dumped with
#   XLA_FLAGS=--xla_dump_to) holds two N x B arrays in the log-sum-exp pass
#   (the logits and their exponentials) and one in the gradient pass, whose
#   gradient block overwrites the logits. The gradient pass is the one that
#   sets the peak, since it also holds dW and dh: its temporaries are
#   N*B (the block) + N*D (the product G_k W_k^T before it is added into
#   dh) + 2*D*B (the weight's columns and the dW block) values. Its budget
#   is 8 MiB with live = 2, so the log-sum-exp pass stays within 8 MiB and
#   the gradient pass adds 4 MiB of chunk arrays to dW + dh: at N = 4096,
#   float32, B = 256 (and 512 at N = 2048). Halving it from 16 MiB cost no
#   measurable time (the fused loop runs at the speed of its matrix
#   products down to B = 256), and saves 4 MiB of peak.
#
# Either way the chunk arrays are independent of V. B is rounded down to
# a multiple of 128 columns (at least 128) so that each chunk's matrix
# product stays efficient.
_CHUNK_BUDGET_BYTES = {"numpy": 16 * 2**20, "numba": 32 * 2**20, "numba-softcap": 32 * 2**20,
                       "tensorflow": 8 * 2**20}
_LIVE_CHUNK_ARRAYS = {"numpy": 5, "numba": 1, "numba-softcap": 2, "tensorflow": 2}
_CHUNK_ALIGN = 128
# A graph with an unknown batch size is budgeted as if it had this many rows.
_ROWS_IF_UNKNOWN = 4096


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    /,
    *,
    bias=None,
    chunk_size=None,
    softcap=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
):
    """Cross-entropy of the logits ``hidden @ weight + bias``, never built.

    Contract: equals ``cross_entropy(hidden @ weight + bias, labels, ...)``
    (with ``x -> softcap * tanh(x / softcap)`` applied to the logits first
    when ``softcap`` is set) without allocating the logits: the vocabulary
    is processed ``chunk_size`` columns at a time with an online
    log-sum-exp (docs/derivations.md#linear-cross-entropy).

    Args:
        hidden: float array of shape ``(..., D)``.
        weight: float array of shape ``(D, V)``, like a Dense kernel, in
            hidden's dtype.
        labels: integer class indices of shape ``hidden.shape[:-1]``.
        bias: optional float array of shape ``(V,)``.
        chunk_size: columns per chunk; any width >= 1 works (widths above V
            mean one chunk). By default it comes from a memory budget for
            the chunk's working set (256 columns for 4096 float32 rows in
            TensorFlow, 2048 in NumPy with the compiled kernels, 128
            without).
        softcap: optional s > 0; the logits become ``s * tanh(x / s)``.
        ignore_index, label_smoothing, reduction, z_loss: as in
            :func:`softgrad.cross_entropy` (integer labels, no class weights).

    Returns:
        A scalar, or an array of shape ``hidden.shape[:-1]`` for
        ``reduction="none"``, in hidden's dtype. NumPy in, NumPy out;
        TensorFlow tensors in, a tensor out, differentiable with respect to
        hidden, weight and bias (the chunks' logits are recomputed in the
        backward pass), eagerly, in ``tf.function`` and under XLA.
    """
    call = _Call(hidden, weight, labels, bias, chunk_size, softcap, ignore_index,
                 label_smoothing, reduction, z_loss)
    if call.xp.name == "tensorflow":
        from .backends import tensorflow_linear_ce

        return tensorflow_linear_ce.loss(call)
    with np.errstate(all="ignore"):
        loss, _ = _numpy_forward(call)
    return call.output(loss)


def linear_cross_entropy_with_grad(
    hidden,
    weight,
    labels,
    /,
    *,
    bias=None,
    chunk_size=None,
    softcap=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
):
    """The loss of :func:`linear_cross_entropy` and its gradients, chunk by chunk.

    Contract: ``(loss, d loss/d hidden, d loss/d weight, d loss/d bias)``
    for ``loss = cross_entropy(hidden @ weight + bias, labels, ...)``, under
    the same memory bound: each chunk's logits are computed twice, once for
    the log-sum-exp and once for its block of the gradient
    ``G = dloss/dlogits``, which then gives ``dhidden += G_k @ W_k.T``,
    ``dweight[:, k] = hidden.T @ G_k`` and ``dbias[k] = G_k.sum(0)``.
    With ``reduction="none"`` the gradients are those of the sum of the
    per-example losses (row n of dhidden is example n's own gradient).

    Returns:
        ``(loss, dhidden, dweight, dbias)`` shaped like their inputs, in
        hidden's dtype; ``dbias`` is None when ``bias`` is None.
    """
    call = _Call(hidden, weight, labels, bias, chunk_size, softcap, ignore_index,
                 label_smoothing, reduction, z_loss)
    if call.xp.name == "tensorflow":
        from .backends import tensorflow_linear_ce

        return tensorflow_linear_ce.loss_and_grads(call)
    with np.errstate(all="ignore"):
        loss, rows = _numpy_forward(call)
        dh, dw, db = _numpy_grads(call, rows, call.scale * call.valid)
    return call.output(loss), call.like_hidden(dh), dw, db


def default_chunk_size(n_rows, n_classes, itemsize, backend="numpy"):
    """Columns per chunk under the memory budget above (at most n_classes)."""
    live = _LIVE_CHUNK_ARRAYS[backend]
    width = _CHUNK_BUDGET_BYTES[backend] // (live * max(n_rows, 1) * itemsize)
    width = max(_CHUNK_ALIGN, width // _CHUNK_ALIGN * _CHUNK_ALIGN)
    return max(1, min(width, n_classes))


class _Call:
    """Validated arguments, flattened to hidden (N, D) and labels (N,)."""

    def __init__(self, hidden, weight, labels, bias, chunk_size, softcap, ignore_index,
                 label_smoothing, reduction, z_loss):
        self.xp = xp = backend_for(hidden, weight, labels, bias)
        h, self.dtype = _validate.floats(xp, hidden, "hidden")
        if len(xp.shape(h)) == 0:
            raise SoftgradError("hidden must have shape (..., D), got a scalar")
        self.batch_shape, n_features = xp.shape(h)[:-1], xp.shape(h)[-1]
        self.weight = _weight(xp, weight, n_features, self.dtype)
        self.n_classes = xp.shape(self.weight)[1]
        self.bias = None if bias is None else _bias(xp, bias, self.n_classes, self.dtype)
        self.ignore_index = _validate.ignore_index(ignore_index)
        self.reduction = _validate.reduction(reduction)
        self.label_smoothing = _validate.non_negative(label_smoothing, "label_smoothing", upper=1.0)
        self.z_loss = _validate.non_negative(z_loss, "z_loss")
        self.softcap = _softcap(softcap)
        t = self._labels(labels)
        self.hidden = xp.reshape(h, (-1, n_features))
        self.labels = xp.reshape(t, (-1,))
        self.chunk_size = _chunk_size(chunk_size, self._rows(), self.n_classes, self.hidden, xp.name,
                                      self.softcap)
        if xp.name == "numpy":
            self.valid = (
                np.ones(self.labels.shape, dtype=bool)
                if self.ignore_index is None
                else self.labels != self.ignore_index
            ).astype(self.hidden.dtype)
            self.scale = _mean_scale(self.valid) if self.reduction == "mean" else 1.0

    def _labels(self, labels):
        xp = self.xp
        t = xp.as_labels(labels)
        if xp.dtype_kind(t) == "f":
            raise SoftgradError(
                f"linear_cross_entropy takes integer class indices, got labels of dtype "
                f"{xp.dtype_name(t)}; soft labels would need the full logits"
            )
        shape = self.batch_shape + (self.n_classes,)
        y, _ = _validate.labels(xp, t, _ShapeOnly(shape), len(shape) - 1, self.ignore_index)
        return y

    def _rows(self):
        known = [d for d in self.batch_shape if d is not None]
        if len(known) < len(self.batch_shape):
            return _ROWS_IF_UNKNOWN
        return math.prod(known)

    def output(self, loss):
        """Per-example losses back in the batch shape, rounded to hidden's dtype."""
        xp = self.xp
        if self.reduction == "none":
            loss = xp.reshape(loss, self.batch_shape)
        return xp.cast(loss, self.dtype)

    def like_hidden(self, dh):
        return self.xp.cast(self.xp.reshape(dh, self.batch_shape + (self.hidden.shape[-1],)), self.dtype)


class _ShapeOnly:
    """Stands in for the logits in label validation: only their shape is read."""

    def __init__(self, shape):
        self.shape = _StaticShape(shape)


class _StaticShape(tuple):
    def as_list(self):
        return list(self)


def _weight(xp, weight, n_features, dtype):
    w = xp.asarray(weight)
    _same_float_dtype(xp, w, "weight", dtype)
    shape = xp.shape(w)
    if len(shape) != 2:
        raise SoftgradError(
            f"weight must have shape (D, V) = ({n_features}, vocabulary size), got shape {shape} "
            f"of rank {len(shape)}"
        )
    if shape[0] not in (n_features, None) and n_features is not None:
        raise SoftgradError(
            f"weight of shape {shape} does not match hidden: its first axis must be "
            f"hidden.shape[-1] = D = {n_features}, got {shape[0]}"
        )
    if shape[1] is None or shape[1] == 0:
        raise SoftgradError(f"weight must have a known vocabulary size V >= 1 on axis 1, got shape {shape}")
    return w


def _bias(xp, bias, n_classes, dtype):
    b = xp.asarray(bias)
    _same_float_dtype(xp, b, "bias", dtype)
    if xp.shape(b) != (n_classes,):
        raise SoftgradError(f"bias must have shape ({n_classes},), one entry per class, got {xp.shape(b)}")
    return b


def _same_float_dtype(xp, a, name, dtype):
    # The weight is not cast as a whole: a float32 copy of a half-precision
    # (D, V) weight would cost more memory than the chunks save.
    if xp.dtype_name(a) != dtype:
        raise SoftgradError(f"{name} must have hidden's dtype {dtype}, got {xp.dtype_name(a)}")


def _softcap(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SoftgradError(f"softcap must be None or a Python float > 0, got {value!r}")
    return float(value)


def _chunk_size(value, n_rows, n_classes, hidden, backend, softcap):
    if value is None:
        if backend == "numpy":
            from . import kernels

            if kernels.enabled():
                backend = "numba" if softcap is None else "numba-softcap"
        itemsize = 8 if hidden.dtype.name == "float64" else 4
        return default_chunk_size(n_rows, n_classes, itemsize, backend)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SoftgradError(f"chunk_size must be None or an int >= 1, got {value!r}")
    return min(value, n_classes)


def _mean_scale(valid):
    """1 / (number of counted examples), and 0 when none counts (docs: mean over zero targets)."""
    n = valid.sum()
    return valid.dtype.type(0.0 if n == 0 else 1.0 / n)


# -- the NumPy driver --------------------------------------------------------


class _NumpyOps:
    exp = staticmethod(np.exp)
    log1p = staticmethod(np.log1p)
    expm1 = staticmethod(np.expm1)
    tanh = staticmethod(np.tanh)
    abs = staticmethod(np.abs)
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    zeros_like = staticmethod(np.zeros_like)

    @staticmethod
    def cast_like(a, like):
        return a.astype(like.dtype)

    @staticmethod
    def rowmax(a):
        return a.max(axis=-1, initial=-np.inf)

    @staticmethod
    def rowsum(a):
        return a.sum(axis=-1)

    @staticmethod
    def take_at(x, local, in_chunk):
        out = np.zeros(x.shape[0], dtype=x.dtype)
        rows = np.flatnonzero(in_chunk)
        out[rows] = x[rows, local[rows]]
        return out

    @staticmethod
    def put_at(g, local, in_chunk, values):
        rows = np.flatnonzero(in_chunk)
        g[rows, local[rows]] = values[rows]
        return g


_NP = _NumpyOps()


def _numpy_chunks(call):
    width, n = call.chunk_size, call.n_classes
    for start in range(0, n, width):
        yield start, min(start + width, n)


def _numpy_logits(call, start, stop):
    """``(x, u / softcap)`` of one chunk, in the compute dtype."""
    h = call.hidden
    u = h @ call.weight[:, start:stop].astype(h.dtype, copy=False)
    if call.bias is not None:
        u += call.bias[start:stop].astype(h.dtype, copy=False)
    return lm.capped(_NP, u, call.softcap)


class _Rows:
    """The per-example statistics pass 1 leaves for the loss and pass 2."""

    def __init__(self, m, log_z, block=None):
        self.m = m
        self.log_z = log_z
        # With the kernels: the block, still holding the last chunk's logits.
        self.block = block


def _numpy_forward(call):
    h, t = call.hidden, call.labels
    n = h.shape[0]
    m = np.full(n, -np.inf, dtype=h.dtype)
    r = np.full(n, -1.0, dtype=h.dtype)
    x_t = np.zeros(n, dtype=h.dtype)
    sum_x = np.zeros(n, dtype=h.dtype)
    if _fused(call):
        from . import kernels

        block = _Block(call)
        labels = t.astype(np.int64, copy=False)
        for start, stop in _numpy_chunks(call):
            u = block.logits(start, stop)
            kernels.linear_chunk_stats(u, block.bias(start, stop), call.softcap, labels, start, m, r, x_t,
                                       sum_x if call.label_smoothing else None)
        block.keep(start, stop)
    else:
        block = None
        for start, stop in _numpy_chunks(call):
            x, _ = _numpy_logits(call, start, stop)
            m, r = lm.merge(_NP, m, r, *lm.chunk_rest(_NP, x))
            local = t - start
            x_t += _NP.take_at(x, local, (local >= 0) & (local < stop - start))
            if call.label_smoothing:
                sum_x += x.sum(axis=-1)
    loss, log_z = lm.row_loss(_NP, m, r, x_t, sum_x, call.n_classes, call.label_smoothing, call.z_loss)
    loss = np.where(call.valid > 0, loss, 0.0)
    if call.reduction != "none":
        loss = loss.sum() * call.scale
    return loss, _Rows(m, log_z, block)


def _numpy_grads(call, rows, coef):
    if _fused(call):
        return _fused_grads(call, rows, coef)
    h, t, w = call.hidden, call.labels, call.weight
    dh = np.zeros(h.shape, dtype=h.dtype)
    dw = np.empty(w.shape, dtype=w.dtype)
    db = None if call.bias is None else np.empty(call.bias.shape, dtype=call.bias.dtype)
    for start, stop in _numpy_chunks(call):
        x, scaled = _numpy_logits(call, start, stop)
        local = t - start
        in_chunk = (local >= 0) & (local < stop - start)
        g = lm.chunk_grad(_NP, x, rows.m, rows.log_z, local, in_chunk, coef,
                          call.n_classes, call.label_smoothing, call.z_loss)
        g = lm.uncapped_grad(_NP, g, scaled)
        w_k = w[:, start:stop].astype(h.dtype, copy=False)
        dh += g @ w_k.T
        dw[:, start:stop] = h.T @ g
        if db is not None:
            db[start:stop] = g.sum(axis=0)
    return dh, dw, db


# -- the fused chunk kernels (softgrad.kernels), when numba is there ----------


def _fused(call):
    from . import kernels

    return kernels.enabled()


class _Block:
    """One N x B buffer that every chunk's logits, then gradient, are written into.

    The matrix products write into it directly (``out=``) and the kernels
    work on it in place, so a pass allocates nothing per chunk; the last,
    narrower chunk uses a contiguous prefix of it.
    """

    def __init__(self, call):
        self.call = call
        self.buffer = np.empty(call.hidden.shape[0] * call.chunk_size, dtype=call.hidden.dtype)
        self.kept = None
        self.second = None

    def weight(self, start, stop):
        # A view of the columns unless the weight is half precision.
        return self.call.weight[:, start:stop].astype(self.call.hidden.dtype, copy=False)

    def bias(self, start, stop):
        b = self.call.bias
        return None if b is None else b[start:stop].astype(self.call.hidden.dtype, copy=False)

    def logits(self, start, stop):
        h = self.call.hidden
        u = self.buffer[: h.shape[0] * (stop - start)].reshape(h.shape[0], stop - start)
        self.kept = None
        return np.matmul(h, self.weight(start, stop), out=u)

    def keep(self, start, stop):
        """Pass 1 ends: the block holds the logits of columns [start, stop).

        Without a soft-cap they are u + b exactly as the gradient kernel
        would form them from u, so pass 2 starts with this chunk and skips
        its matrix product: one of the 4 per chunk, an eighth of the
        products at two chunks, all of the recomputation at one.
        (The capped logits lose u / s, which the soft-cap's derivative needs.)
        """
        self.kept = (start, stop) if self.call.softcap is None else None

    def scratch(self, g):
        """With a soft-cap, a second block of g's shape for the capped logits (pass 2 needs u / s too)."""
        if self.call.softcap is None:
            return None
        if self.second is None:
            self.second = np.empty_like(self.buffer)
        return self.second[: g.size].reshape(g.shape)

    def kept_logits(self, start, stop):
        """The kept chunk's logits if [start, stop) is it, else None."""
        if self.kept != (start, stop):
            return None
        return self.buffer[: self.call.hidden.shape[0] * (stop - start)].reshape(-1, stop - start)


def _fused_grads(call, rows, coef):
    from . import kernels

    h, w = call.hidden, call.weight
    labels = call.labels.astype(np.int64, copy=False)
    dh = np.zeros(h.shape, dtype=h.dtype)
    product = np.empty(h.shape, dtype=h.dtype)
    dw = np.empty(w.shape, dtype=w.dtype)
    db = None if call.bias is None else np.empty(call.bias.shape, dtype=call.bias.dtype)
    block = rows.block
    # Last chunk first: pass 1 left its logits in the block.
    for start, stop in reversed(list(_numpy_chunks(call))):
        g = block.kept_logits(start, stop)
        bias = None
        if g is None:
            g = block.logits(start, stop)
            bias = block.bias(start, stop)
        kernels.linear_chunk_grad(g, bias, call.softcap, labels, start, rows.m, rows.log_z, coef,
                                  call.n_classes, call.label_smoothing, call.z_loss, block.scratch(g))
        w_k = block.weight(start, stop)
        np.matmul(g, w_k.T, out=product)
        dh += product
        if dw.dtype == h.dtype:
            np.matmul(h.T, g, out=dw[:, start:stop])
        else:
            dw[:, start:stop] = h.T @ g
        if db is not None:
            db[start:stop] = g.sum(axis=0)
    return dh, dw, db
