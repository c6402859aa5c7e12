"""Fused, multi-threaded CPU kernels for the NumPy backend.

Each kernel computes one whole operation of ``softgrad._maths`` in one or two
passes over each row, rows in parallel, without temporaries the size of the
input: the max, then the sum of exponentials (while writing e^z where the
output needs it), then the output. They are compiled with numba (imported on
the first call, never at ``import softgrad``) and cached on disk, so only the
very first call of each kernel pays for compiling it.

The functions below take already-validated arrays: ``x`` 2-D ``(rows, C)``,
C-contiguous, float32 or float64, the class axis last; other arrays of the
same shape and dtype. They return new arrays of ``x``'s dtype (the memory
of large ones is recycled from earlier calls, see :func:`release_buffers`). Call them
only when :func:`enabled` is True; otherwise the backend uses the generic
NumPy path of ``softgrad._maths``, which the kernels agree with to the
tolerances of the test suite.

Set the environment variable ``SOFTGRAD_PURE_NUMPY=1`` to force the NumPy
path (it is read on the first call that could use a kernel); without numba
that path is used anyway, and :func:`status` says why.

numba keys its on-disk cache on each kernel's own source file: after editing
``_rows.py`` or ``_primitives.py`` alone, delete ``kernels/__pycache__`` or
the kernels keep the old helpers compiled in.
"""

import os

import numpy as np

from .._errors import SoftgradError
from . import _buffers

__all__ = [
    "status",
    "enabled",
    "softmax",
    "log_softmax",
    "softmax_vjp",
    "log_softmax_vjp",
    "softmax_jacobian",
    "cross_entropy",
    "cross_entropy_with_grad",
    "release_buffers",
]

ENV_SWITCH = "SOFTGRAD_PURE_NUMPY"

_state = {}
_compiled = {}


def _load():
    if _state:
        return
    if os.environ.get(ENV_SWITCH, "").strip() not in ("", "0"):
        _state.update(path="numpy", reason=f"{ENV_SWITCH}={os.environ[ENV_SWITCH]} forces the NumPy path")
        return
    try:
        from . import _apart, _cross_entropy, _short, _softmax
    except ImportError as error:
        _state.update(path="numpy", reason=f"numba is not available ({error}); pip install 'softgrad[fast]'")
        return
    import numba

    _compiled.update(numba=numba, apart=_apart, softmax=_softmax, cross_entropy=_cross_entropy, short=_short)
    _state.update(path="numba", reason=f"numba {numba.__version__} kernels, {numba.get_num_threads()} threads")


def status() -> dict:
    """Which path the NumPy backend takes: ``{"path": "numba" | "numpy", "reason": str}``."""
    _load()
    return dict(_state)


def enabled() -> bool:
    """True when the compiled kernels are in use."""
    _load()
    return _state["path"] == "numba"


def release_buffers() -> int:
    """Give back the memory of pooled outputs that no array uses any more; returns the bytes.

    Outputs of 4 MiB or more come from a small pool (at most 8 buffers),
    so that a loop calling the same kernels at every step does not pay the
    operating system's zeroing of fresh pages each time. Arrays handed out
    are ordinary arrays; their memory is reused only once nothing refers to
    it. See ``kernels/_buffers.py``.
    """
    return _buffers.release()


def _module(name):
    if not enabled():
        raise SoftgradError(f"the compiled kernels are not in use: {_state['reason']}")
    return _compiled[name]


# Below this many entries (4 MiB of float32) a kernel runs on the calling
# thread: waking the other threads costs tens of microseconds on an idle
# machine and milliseconds on a busy one, where they wait for a time slice.
_PARALLEL_MIN = 1 << 20


def _launch(kernel, size, *args):
    """``kernel(*args)``, on the calling thread alone below ``_PARALLEL_MIN``;
    compiled in a child process if numba's cache misses it (``_apart.py``)."""
    call = _compiled["apart"].call
    if size >= _PARALLEL_MIN:
        call(kernel, args)
        return
    numba = _compiled["numba"]
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        call(kernel, args)
    finally:
        numba.set_num_threads(threads)


def _t(x, temperature):
    return None if temperature == 1.0 else x.dtype.type(temperature)


def _lowest(x):
    return np.finfo(x.dtype).min


# Outputs from this size on are written with streaming stores, which skip
# reading each line before writing it (``_rows.stream_row``), but leave the
# output out of the caches: worth it only where it would not stay there.
# At (1024, 32768) float32 softmax_vjp takes 30% less time streamed; at
# 8 MiB, which the last-level cache holds, streaming is slower.
_STREAM_MIN = 1 << 25

# An entry of a short row costs a few of a long row's: cross-entropy at
# 65536 x 10 takes 10 ns an entry on one thread, against 2.4 at 1024 x 32768.
_SHORT_COST = 4


def _for_rows(x, name):
    """(kernels, work, extra) for ``x``'s rows: ``_short.py``'s kernels, a
    tile of rows at a time, when the rows are short, else those of ``name``;
    what :func:`_launch` weighs against ``_PARALLEL_MIN``, x's entries with
    each of a short row counted ``_SHORT_COST`` times; and the arguments the
    long-row kernels take after their output: whether to stream it, and in
    how many bands of rows (one a thread)."""
    short = _module("short")
    if x.shape[-1] < short.SHORT:
        return short, x.size * _SHORT_COST, ()
    return _module(name), x.size, (x.nbytes >= _STREAM_MIN, _bands(x.shape[0]))


def _bands(n_rows):
    """Bands of rows a long-row kernel splits ``n_rows`` rows into: one a thread."""
    return max(1, min(n_rows, _compiled["numba"].get_num_threads()))


def softmax(x, temperature=1.0):
    """softmax over the last axis of ``x`` (rows, C), ``temperature`` a float > 0."""
    out = _buffers.empty(x.shape, x.dtype)
    if x.size:
        kernels, work, extra = _for_rows(x, "softmax")
        _launch(kernels.softmax, work, x, _t(x, temperature), out, *extra)
    return out


def log_softmax(x, temperature=1.0):
    """log-softmax over the last axis of ``x`` (rows, C)."""
    out = _buffers.empty(x.shape, x.dtype)
    if x.size:
        kernels, work, extra = _for_rows(x, "softmax")
        _launch(kernels.log_softmax, work, x, _t(x, temperature), _lowest(x), out, *extra)
    return out


def softmax_vjp(y, dy):
    """``y * (dy - sum(dy * y))`` per row, with the argmax shift for precision."""
    out = _buffers.empty(y.shape, y.dtype)
    if y.size:
        kernels, work, extra = _for_rows(y, "softmax")
        _launch(kernels.softmax_vjp, work, y, dy, out, *extra)
    return out


def log_softmax_vjp(logp, dlogp):
    """``dlogp - exp(logp) * sum(dlogp)`` per row; 0 where logp = -inf."""
    out = _buffers.empty(logp.shape, logp.dtype)
    if logp.size:
        kernels, work, _ = _for_rows(logp, "softmax")
        _launch(kernels.log_softmax_vjp, work, logp, dlogp, out)
    return out


def softmax_jacobian(y, temperature=1.0):
    """``y_i (delta_ij - y_j) / T`` for each row of ``y`` (rows, C): shape (rows, C, C)."""
    out = _buffers.empty(y.shape + y.shape[-1:], y.dtype)
    if y.size:
        # one output row per (n, i)
        _launch(_module("softmax").softmax_jacobian, out.size, y, _t(y, temperature), out,
                out.nbytes >= _STREAM_MIN, _bands(y.size))
    return out


def cross_entropy(x, labels, *, weight=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """The loss of :func:`cross_entropy_with_grad`, without the gradient."""
    loss, _ = _run_cross_entropy(x, labels, weight, ignore_index, label_smoothing, z_loss, reduction, False)
    return loss


def cross_entropy_with_grad(
    x, labels, *, weight=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0, reduction="mean"
):
    """(loss, d loss / d x) of softmax cross-entropy, as ``softgrad.cross_entropy_with_grad``.

    ``labels``: integer class indices of shape (rows,), or soft labels shaped
    and typed like ``x``. ``weight``: None or (C,) of ``x``'s dtype.
    ``reduction``: "mean", "sum" or "none" (then ``loss`` has shape (rows,)).
    """
    return _run_cross_entropy(x, labels, weight, ignore_index, label_smoothing, z_loss, reduction, True)


def _run_cross_entropy(x, labels, weight, ignore_index, eps, z_loss, reduction, want_grad):
    dtype = x.dtype.type
    n_rows, n_classes = x.shape
    soft = labels.dtype.kind == "f"
    a = dtype(1.0 - eps)
    b = dtype(eps / n_classes) if n_classes else dtype(0)
    if soft:
        denominator = n_rows
    else:
        labels = labels.astype(np.int64, copy=False)
        counted = labels if ignore_index is None else labels[labels != ignore_index]
        denominator = counted.size if weight is None else np.sum(weight[counted], dtype=np.float64)
        ignore_index = np.iinfo(np.int64).min if ignore_index is None else ignore_index
    divide_after = False
    if reduction != "mean":
        scale = dtype(1)
    else:
        # A mean over zero targets is 0 with zero gradient, not 0/0.
        denominator = dtype(denominator)
        with np.errstate(over="ignore"):
            scale = dtype(0) if denominator == 0 else dtype(1) / denominator
        # Class weights summing to a subnormal number: 1 / denominator
        # overflows, so the gradient is divided after the kernel instead.
        divide_after = bool(np.isinf(scale))
        scale = dtype(1) if divide_after else scale
    per_example = np.zeros(n_rows, dtype=np.float64)
    grad = _buffers.empty(x.shape, x.dtype) if want_grad else None
    if x.size:
        options = (a, b, float(z_loss), float(scale), _lowest(x), per_example, grad)
        kernels, work, extra = _for_rows(x, "cross_entropy")
        if soft:
            _launch(kernels.with_soft_labels, work, x, labels, weight, *options, *extra)
        else:
            _launch(kernels.with_labels, work, x, labels, weight, ignore_index, *options, *extra)
    # A loss beyond x's dtype (a true overflow: z_loss on a saturated row)
    # rounds to inf, quietly, as on the NumPy path.
    with np.errstate(over="ignore"):
        if reduction == "none":
            return per_example.astype(x.dtype), grad
        if scale == 0:
            return dtype(0), grad
        if divide_after:
            if grad is not None:
                np.divide(grad, denominator, out=grad)
            return dtype(per_example.sum() / np.float64(denominator)), grad
        return dtype(per_example.sum()) * scale, grad


# -- the per-chunk kernels of the NumPy linear cross-entropy -----------------


def _linear_kernels():
    if "linear" not in _compiled:
        _module("softmax")  # raises when the kernels are not in use
        from . import _linear

        _compiled["linear"] = _linear
    return _compiled["linear"]


def _bias_args(u, bias):
    if bias is None:
        return np.empty(0, u.dtype), False
    return bias, True


def _cap_in_place(u, bias, softcap):
    """u <- (u + bias) / softcap, as ``_linear_maths.capped`` forms a."""
    if bias is not None:
        u += bias
    return np.divide(u, softcap, out=u)


def linear_chunk_stats(u, bias, softcap, labels, start, m, r, x_t, sum_x):
    """Pass 1 of ``softgrad.linear_cross_entropy`` on one chunk, in place.

    ``u`` (rows, B) C-contiguous holds ``hidden @ W[:, start:start+B]`` and is
    overwritten by the chunk's logits (bias added, soft-capped); the rows'
    running ``m``, ``r`` (``_linear_maths.merge``), the label's logit ``x_t``
    and, unless ``sum_x`` is None, the row sums are updated. ``bias``: the
    chunk's (B,) bias or None; ``softcap``: a float or None; ``labels``:
    int64 (rows,).
    """
    if softcap is not None:
        a = _cap_in_place(u, bias, softcap)
        np.multiply(np.tanh(a, out=a), softcap, out=u)
        bias = None
    b, has_bias = _bias_args(u, bias)
    want_sum = sum_x is not None
    # The kernel writes no sums when want_sum is False: m stands in for them.
    sums = sum_x if want_sum else m
    if u.size:
        _compiled["apart"].call(_linear_kernels().stats, (u, b, has_bias, labels, start, m, r, x_t, sums, want_sum,
                                                          _lowest(u)))


def linear_chunk_grad(u, bias, softcap, labels, start, m, log_z, coef, n_classes, label_smoothing, z_loss,
                      scratch=None):
    """Pass 2 on one chunk: overwrite ``u = hidden @ W_k`` by d loss / d u, in place.

    ``_linear_maths.chunk_grad`` followed by ``uncapped_grad``, with the rows'
    final ``m`` and ``log_z = log1p(r)`` and ``coef`` (scale times upstream
    gradient per row, 0 for ignored rows). With a soft-cap the capped
    logits go to ``scratch`` (an array of u's shape, allocated when None),
    next to u / s, which the cap's derivative needs.
    """
    capped, has_cap = u, False
    if softcap is not None:
        a = _cap_in_place(u, bias, softcap)
        capped = np.tanh(a, out=np.empty_like(u) if scratch is None else scratch)
        np.multiply(capped, softcap, out=capped)
        bias, has_cap = None, True
    b, has_bias = _bias_args(u, bias)
    eps = float(label_smoothing)
    if u.size:
        _compiled["apart"].call(_linear_kernels().grad, (u, b, has_bias, capped, has_cap, labels, start, m, log_z,
                                                         coef, eps / n_classes, eps * (1.0 - 1.0 / n_classes),
                                                         float(z_loss)))
