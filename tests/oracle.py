"""The float64 NumPy reference of every public softgrad op.

Each function is the naive formula from the docstrings, written for clarity:
the class axis is moved last, masked entries become -inf, and the derivatives
are built from the explicit Jacobian. Only the cases the formulas leave
undefined get an explicit rule, the project's "-inf is absent" semantics:
a row with no entry left has softmax 0, log-softmax -inf, gradient 0.
"""

import numpy as np


def _last(a, axis):
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


def _row_max(z):
    """max over the class axis, 0 where the whole row is -inf (nothing to shift)."""
    m = np.max(z, axis=-1, keepdims=True, initial=-np.inf)
    return np.where(m == -np.inf, 0.0, m)


def _shifted(x, axis, temperature, where):
    """(z = (x - max x) / T with masked entries at -inf, class axis last; T per row)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), x.shape)
    if where is not None:
        x = np.where(where, x, -np.inf)
    x, t = _last(x, axis), _last(t, axis)
    # halved (exactly) so that x - max x of float64 logits +-finfo.max stays
    # in range until T has scaled it
    with np.errstate(over="ignore", invalid="ignore"):
        return (x / 2 - _row_max(x) / 2) / t * 2, t[..., :1]


def softmax(x, axis=-1, temperature=1.0, where=None):
    z, _ = _shifted(x, axis, temperature, where)
    e = np.exp(z)
    with np.errstate(invalid="ignore"):
        total = e.sum(axis=-1, keepdims=True)
        s = np.where(total == 0, 0.0, e / np.where(total == 0, 1.0, total))
    return np.moveaxis(s, -1, axis)


def log_softmax(x, axis=-1, temperature=1.0, where=None):
    z, _ = _shifted(x, axis, temperature, where)
    total = np.exp(z).sum(axis=-1, keepdims=True)
    # a row with nothing left stays at -inf rather than -inf - log 0
    with np.errstate(invalid="ignore"):
        lse = np.log(np.where(total == 0, 1.0, total))
    return np.moveaxis(z - lse, -1, axis)


def logsumexp(x):
    """log sum exp over the last axis, -inf for an empty or all -inf row."""
    m = _row_max(x)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def softmax_jacobian(x, axis=-1, temperature=1.0, where=None):
    """J[..., i, j] = d s_i / d x_j = (diag(s) - s s^T)[i, j] / T."""
    _, t = _shifted(x, axis, temperature, where)
    s = _last(softmax(x, axis, temperature, where), axis)
    jac = s[..., :, None] * np.eye(s.shape[-1]) - s[..., :, None] * s[..., None, :]
    return jac / t[..., None]


def log_softmax_jacobian(x, axis=-1, temperature=1.0, where=None):
    """J[..., i, j] = d log s_i / d x_j = (delta_ij - s_j) / T for present i, else 0."""
    _, t = _shifted(x, axis, temperature, where)
    s = _last(softmax(x, axis, temperature, where), axis)
    present = _last(x if where is None else np.where(where, x, -np.inf), axis) > -np.inf
    jac = (np.eye(s.shape[-1]) - s[..., None, :]) * present[..., :, None]
    return jac / t[..., None]


def softmax_vjp(y, dy, axis=-1):
    """J^T dy = y * (dy - sum(dy * y))."""
    y, dy = _last(y, axis), _last(dy, axis)
    return np.moveaxis(y * (dy - np.sum(dy * y, axis=-1, keepdims=True)), -1, axis)


def softmax_jvp(y, dx, axis=-1):
    """J dx = y * (dx - sum(y * dx)), the same form since J is symmetric."""
    y, dx = _last(y, axis), _last(dx, axis)
    return np.moveaxis(y * (dx - np.sum(y * dx, axis=-1, keepdims=True)), -1, axis)


def log_softmax_vjp(logp, dlogp, axis=-1):
    """J^T g = g - exp(logp) * sum(g), over the entries with logp > -inf."""
    logp, g = _last(logp, axis), _last(dlogp, axis)
    present = logp > -np.inf
    g = np.where(present, g, 0.0)
    dx = g - np.exp(logp) * g.sum(axis=-1, keepdims=True)
    return np.moveaxis(np.where(present, dx, 0.0), -1, axis)


def log_softmax_jvp(logp, dx, axis=-1):
    """J dx = dx - sum(exp(logp) * dx), over the entries with logp > -inf."""
    logp, dx = _last(logp, axis), _last(dx, axis)
    present = logp > -np.inf
    dx = np.where(present, dx, 0.0)
    out = dx - np.sum(np.exp(logp) * dx, axis=-1, keepdims=True)
    return np.moveaxis(np.where(present, out, 0.0), -1, axis)


def _targets(logits, labels, axis, weight, ignore_index, label_smoothing):
    """(x, q, valid, denominator): class axis last, q = ((1 - eps) Y + eps / C) * w."""
    x = _last(logits, axis)
    n_classes = x.shape[-1]
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
        safe = np.where(valid, labels, 0)
        y = np.eye(n_classes)[safe]
        denominator = np.sum(np.where(valid, w[safe], 0.0))
    else:
        y = _last(labels, axis)
        valid = np.ones(x.shape[:-1], bool)
        denominator = float(valid.size)
    q = ((1 - label_smoothing) * y + label_smoothing / n_classes) * w
    return x, q, valid, denominator


def _reduce(per_example, valid, denominator, reduction):
    per_example = np.where(valid, per_example, 0.0)
    if reduction == "none":
        return per_example
    total = np.sum(per_example)
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else 0.0


def _reduced(value, valid, denominator, reduction):
    """Per-example ``value`` (with trailing axes) times d loss / d (per-example loss).

    Divides by the denominator: a subnormal sum of weights has no finite reciprocal.
    """
    v = valid.reshape(valid.shape + (1,) * (np.ndim(value) - valid.ndim))
    if reduction == "mean":
        return value * v / denominator if denominator != 0 else value * v * 0.0
    return value * v


def cross_entropy(logits, labels, axis=-1, weight=None, ignore_index=None,
                  label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """-sum_c q_c log_softmax(x)_c + z_loss * lse(x)^2 per example, then reduced."""
    x, q, valid, denominator = _targets(logits, labels, axis, weight, ignore_index, label_smoothing)
    logp = log_softmax(x)
    with np.errstate(invalid="ignore"):
        cross = -np.sum(np.where(q == 0, 0.0, q * logp), axis=-1)
    per_example = cross + z_loss * logsumexp(x) ** 2 if z_loss else cross
    return _reduce(per_example, valid, denominator, reduction)


def cross_entropy_grad(logits, labels, axis=-1, weight=None, ignore_index=None,
                       label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """-q^T J_logsoftmax + 2 z_loss lse p, per example, times the reduction's scale."""
    x, q, valid, denominator = _targets(logits, labels, axis, weight, ignore_index, label_smoothing)
    grad = -np.einsum("...c,...cj->...j", q, log_softmax_jacobian(x))
    if z_loss:
        grad = grad + 2 * z_loss * logsumexp(x)[..., None] * softmax(x)
    grad = _reduced(grad, valid, denominator, reduction)
    return np.moveaxis(grad, -1, axis)


def cross_entropy_hessian(logits, labels, axis=-1, weight=None, ignore_index=None,
                          label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """Per-example Hessian (class axis last): the Jacobian of S p - q + 2 z lse p,
    (S + 2 z lse) J_softmax + 2 z p p^T, times the reduction's scale."""
    x, q, valid, denominator = _targets(logits, labels, axis, weight, ignore_index, label_smoothing)
    p = softmax(x)
    total = q.sum(axis=-1) + 2 * z_loss * logsumexp(x)
    hess = total[..., None, None] * softmax_jacobian(x) + 2 * z_loss * p[..., :, None] * p[..., None, :]
    return _reduced(hess, valid, denominator, reduction)


def cross_entropy_hvp(logits, labels, v, axis=-1, **options):
    """H v with the explicit Hessian; each example's own Hessian for "none"."""
    hess = cross_entropy_hessian(logits, labels, axis=axis, **options)
    hv = np.einsum("...ij,...j->...i", hess, _last(v, axis))
    return np.moveaxis(hv, -1, axis)


def cross_entropy_soft_label_grad(logits, labels, axis=-1, weight=None,
                                  label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """d loss / d Y = -(1 - eps) w_c log p_c, times the reduction's scale."""
    x, _, valid, denominator = _targets(logits, labels, axis, weight, None, label_smoothing)
    w = np.ones(x.shape[-1]) if weight is None else np.asarray(weight, dtype=np.float64)
    grad = -(1 - label_smoothing) * w * log_softmax(x)
    grad = _reduced(grad, valid, denominator, reduction)
    return np.moveaxis(grad, -1, axis)
