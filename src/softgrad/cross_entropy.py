"""Softmax cross-entropy, its fused gradient and its Hessian-vector product.

The options mean what they mean in PyTorch's
``torch.nn.functional.cross_entropy``; the one difference is that a "mean"
over a batch whose every target is ignored is 0 (with zero gradient), not
NaN. The maths is derived in docs/derivations.md#cross-entropy.
"""

from . import _layout, _maths, _validate


def cross_entropy(
    logits,
    labels,
    /,
    *,
    axis=-1,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
):
    """Softmax cross-entropy between logits and labels.

    Contract, for integer labels ``t`` with no options:
    ``mean(logsumexp(x, axis) - take_along_axis(x, t, axis))``; in general
    ``-sum(q * log_softmax(x), axis) + z_loss * logsumexp(x, axis)**2`` per
    example, with target weights ``q = ((1 - eps) * Y + eps / C) * weight``
    (``Y`` one-hot or the soft labels), reduced as PyTorch does
    (derivations.md#cross-entropy).

    Args:
        logits: float array; the class axis is ``axis``.
        labels: integer class indices, shaped like ``logits`` without the
            class axis, or float class probabilities shaped like ``logits``.
        weight: optional per-class weights, shape ``(C,)``.
        ignore_index: integer labels equal to it contribute nothing (integer
            labels only).
        label_smoothing: eps in [0, 1].
        reduction: "mean" (divide by the total weight of the non-ignored
            targets; by the number of examples for soft labels), "sum" or
            "none" (one loss per example).
        z_loss: coefficient of PaLM's auxiliary ``logsumexp(x)**2`` term
            (derivations.md#z-loss); not multiplied by class weights.

    Returns:
        A scalar, or an array of the batch shape for ``reduction="none"``,
        in the logits' dtype. A confident correct prediction's loss keeps its
        full relative precision (it is ``log1p`` of the other probabilities).

    >>> float(cross_entropy([[0.0, 40.0]], [1]))  # exp(-40), not 0
    4.248354255291589e-18
    """
    call, tg, options = _prepare(logits, labels, axis, weight, ignore_index, label_smoothing, reduction, z_loss)
    with call.xp.quiet():
        return call.rounded(call.xp.cross_entropy(call.value, tg, **options))


def cross_entropy_with_grad(
    logits,
    labels,
    /,
    *,
    axis=-1,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
):
    """The loss of :func:`cross_entropy` and its gradient, in one pass.

    Contract: ``(cross_entropy(x, labels, ...), d cross_entropy / d x)``;
    without options the gradient is ``(softmax(x) - one_hot(labels)) / N``
    (derivations.md#cross-entropy-gradient). In general it is
    ``(S * p - q) + 2 * z_loss * logsumexp(x) * p`` per example with
    ``S = sum(q)``, scaled like the loss. With ``reduction="none"``, row n
    is the gradient of example n's own loss. Each row of the cross-entropy
    part sums to zero, and small components keep their relative precision
    next to a probability of one (derivations.md#precision).

    Returns:
        ``(loss, dlogits)``, with ``dlogits`` shaped like ``logits``.
    """
    call, tg, options = _prepare(logits, labels, axis, weight, ignore_index, label_smoothing, reduction, z_loss)
    with call.xp.quiet():
        loss, grad = call.xp.cross_entropy_with_grad(call.value, tg, **options)
        return call.rounded(loss), call.from_last(grad)


def cross_entropy_hvp(
    logits,
    labels,
    v,
    /,
    *,
    axis=-1,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
):
    """Hessian of :func:`cross_entropy` with respect to the logits, times ``v``.

    Contract: ``H @ v`` per example with
    ``H = (S + 2 z_loss lse) (diag(p) - outer(p, p)) + 2 z_loss outer(p, p)``,
    scaled like the loss (derivations.md#hessian); with ``z_loss=0`` this is
    the Gauss-Newton / Fisher product used by second-order optimisers.
    O(N*C): H is never built.

    Returns:
        An array shaped like ``logits``.
    """
    call, tg, options = _prepare(logits, labels, axis, weight, ignore_index, label_smoothing, reduction, z_loss, v)
    with call.xp.quiet():
        vv = _layout.cotangent(call, v, "v")
        return call.from_last(call.xp.cross_entropy_hvp(call.value, tg, vv, **options))


def _prepare(logits, labels, axis, weight, ignore_index, label_smoothing, reduction, z_loss, *others):
    """Validate everything; return the logits call, the targets and the options."""
    call = _layout.Logits(logits, axis, labels, weight, *others, name="logits")
    xp = call.xp
    ignore_index = _validate.ignore_index(ignore_index)
    options = {
        "reduction": _validate.reduction(reduction),
        "z_loss": _validate.non_negative(z_loss, "z_loss"),
    }
    eps = _validate.non_negative(label_smoothing, "label_smoothing", upper=1.0)
    n_classes = xp.shape(call.value)[-1]
    y, soft = _validate.labels(xp, labels, call.original, call.axis, ignore_index)
    if soft:
        y = call.to_last(xp.cast_to(y, call.value.dtype))
    w = _validate.weight(xp, weight, n_classes, call.value.dtype)
    with xp.quiet():
        tg = _maths.targets(
            xp,
            y,
            n_classes,
            call.value.dtype,
            soft=soft,
            weight=w,
            ignore_index=ignore_index,
            label_smoothing=eps,
        )
    return call, tg, options
