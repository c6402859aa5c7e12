"""Softmax and log-softmax, their explicit Jacobians, VJPs and JVPs.

All functions take NumPy arrays (or lists) or TensorFlow tensors and return
the same kind. The class axis is ``axis`` (default -1). The maths is derived
in docs/derivations.md.
"""

from . import _layout


def softmax(x, /, *, axis=-1, temperature=1.0, where=None):
    """Numerically stable softmax.

    Contract: ``exp(x / T) / sum(exp(x / T), axis)`` over the entries where
    ``where`` is True, 0 elsewhere (derivations.md#softmax).

    Args:
        x: logits, any float dtype; float16/bfloat16 are computed in float32.
        axis: the class axis.
        temperature: a float > 0, or an array with size 1 on the class axis
            that broadcasts against ``x`` (a per-row temperature).
        where: optional boolean mask broadcastable to ``x``; masked-out
            entries get probability 0 and zero gradient.

    Returns:
        An array like ``x``. A row with no entry left (all masked or all
        -inf) is all zeros. A NaN or +inf logit makes its own row NaN.

    >>> softmax([1.0, 2.0, 3.0]).round(4)
    array([0.09  , 0.2447, 0.6652])
    """
    call = _layout.Logits(x, axis, temperature, where)
    with call.xp.quiet():
        t, m = call.options(temperature, where)
        return call.from_last(call.xp.softmax(call.value, t, m))


def log_softmax(x, /, *, axis=-1, temperature=1.0, where=None):
    """Numerically stable log-softmax.

    Contract: ``log(softmax(x, axis=axis, temperature=temperature, where=where))``,
    computed without forming the softmax, so it is exact where the softmax
    underflows (derivations.md#log-softmax). Masked-out entries are -inf.

    >>> log_softmax([1e308, 1.0]).tolist()
    [0.0, -1e+308]
    """
    call = _layout.Logits(x, axis, temperature, where)
    with call.xp.quiet():
        t, m = call.options(temperature, where)
        return call.from_last(call.xp.log_softmax(call.value, t, m))


def softmax_jacobian(x, /, *, axis=-1, temperature=1.0, where=None):
    """The explicit Jacobian of :func:`softmax` with respect to ``x``.

    Contract: ``(diag(s) - outer(s, s)) / T`` per row, with
    ``s = softmax(x, ...)``; entry ``[..., i, j]`` is ``ds_i / dx_j``
    (derivations.md#jacobian). Its rows and columns sum to zero, so summing
    it over an axis is never a derivative: for backprop use
    :func:`softmax_vjp`.

    Returns:
        Shape ``batch + (C, C)``, where ``batch`` is ``x.shape`` without the
        class axis. This builds C*C numbers per row; prefer the VJP/JVP.
    """
    call = _layout.Logits(x, axis, temperature, where)
    with call.xp.quiet():
        t, m = call.options(temperature, where)
        return call.rounded(call.xp.softmax_jacobian(call.value, t, m))


def log_softmax_jacobian(x, /, *, axis=-1, temperature=1.0, where=None):
    """The explicit Jacobian of :func:`log_softmax` with respect to ``x``.

    Contract: ``(eye(C) - s[None, :]) / T`` per row, with
    ``s = softmax(x, ...)``; entry ``[..., i, j]`` is ``d log s_i / dx_j``
    (derivations.md#jacobian). Rows of masked-out entries are zero.

    Returns:
        Shape ``batch + (C, C)``.
    """
    call = _layout.Logits(x, axis, temperature, where)
    with call.xp.quiet():
        t, m = call.options(temperature, where)
        return call.rounded(call.xp.log_softmax_jacobian(call.value, t, m))


def softmax_vjp(y, dy, /, *, axis=-1):
    """Vector-Jacobian product of softmax, from its output.

    Contract: ``y * (dy - sum(dy * y, axis, keepdims=True))``, which equals
    ``J.T @ dy`` with ``J = softmax_jacobian(x)`` and ``y = softmax(x)``
    (derivations.md#vjp-and-jvp). O(N*C): J is never built. Components next
    to a probability of one keep their full relative precision
    (derivations.md#precision).

    >>> y = softmax([0.0, 1.0, 2.0])
    >>> softmax_vjp(y, [1.0, 0.0, 0.0]).round(4)
    array([ 0.0819, -0.0220, -0.0599])
    """
    call = _layout.Logits(y, axis, dy, name="y")
    with call.xp.quiet():
        d = _layout.cotangent(call, dy, "dy")
        return call.from_last(call.xp.softmax_vjp(call.value, d))


def softmax_jvp(y, dx, /, *, axis=-1):
    """Jacobian-vector product of softmax, from its output.

    Contract: ``y * (dx - sum(dx * y, axis, keepdims=True))``, which equals
    ``J @ dx``; the softmax Jacobian is symmetric, so this is the same
    formula as :func:`softmax_vjp` (derivations.md#vjp-and-jvp).
    """
    call = _layout.Logits(y, axis, dx, name="y")
    with call.xp.quiet():
        d = _layout.cotangent(call, dx, "dx")
        return call.from_last(call.xp.softmax_vjp(call.value, d))


def log_softmax_vjp(logp, dlogp, /, *, axis=-1):
    """Vector-Jacobian product of log-softmax, from its output.

    Contract: ``dlogp - exp(logp) * sum(dlogp, axis, keepdims=True)``, which
    equals ``J.T @ dlogp`` with ``J = log_softmax_jacobian(x)``
    (derivations.md#vjp-and-jvp). Entries with ``logp == -inf`` (masked out)
    are treated as absent: they get 0 and do not enter the sum. Each row of
    the result sums to zero (derivations.md#precision).
    """
    call = _layout.Logits(logp, axis, dlogp, name="logp")
    with call.xp.quiet():
        d = _layout.cotangent(call, dlogp, "dlogp")
        return call.from_last(call.xp.log_softmax_vjp(call.value, d))


def log_softmax_jvp(logp, dx, /, *, axis=-1):
    """Jacobian-vector product of log-softmax, from its output.

    Contract: ``dx - sum(exp(logp) * dx, axis, keepdims=True)``, which equals
    ``J @ dx`` (derivations.md#vjp-and-jvp); entries with ``logp == -inf``
    get 0.
    """
    call = _layout.Logits(logp, axis, dx, name="logp")
    with call.xp.quiet():
        d = _layout.cotangent(call, dx, "dx")
        return call.from_last(call.xp.log_softmax_jvp(call.value, d))
