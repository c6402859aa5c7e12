"""Routing of whole NumPy-backend operations to the fused kernels.

:class:`KernelRouting` sits before :class:`Backend` in the NumPy backend's
bases. Each method hands the operation to ``softgrad.kernels`` when a kernel
applies (compiled kernels in use, float32/float64, no mask, a scalar
temperature), with the arrays reshaped to (rows, C); otherwise it falls back
to the generic maths through ``super()``.
"""

import numpy as np

from .. import kernels

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _rows(a):
    """``a`` as a C-contiguous (rows, C) view or copy."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def _applies(*arrays, temperature=1.0, mask=None):
    first = arrays[0]
    return (
        mask is None
        and isinstance(temperature, float)
        and first.size > 0
        and all(isinstance(a, np.ndarray) and a.dtype == first.dtype for a in arrays)
        and first.dtype in _DTYPES
        and kernels.enabled()
    )


class KernelRouting:
    def softmax(self, x, temperature, mask):
        if not _applies(x, temperature=temperature, mask=mask):
            return super().softmax(x, temperature, mask)
        return kernels.softmax(_rows(x), temperature).reshape(x.shape)

    def log_softmax(self, x, temperature, mask):
        if not _applies(x, temperature=temperature, mask=mask):
            return super().log_softmax(x, temperature, mask)
        return kernels.log_softmax(_rows(x), temperature).reshape(x.shape)

    def softmax_jacobian(self, x, temperature, mask):
        y = self.softmax(x, temperature, mask)
        if not _applies(y, temperature=temperature):
            return super().softmax_jacobian(x, temperature, mask)
        return kernels.softmax_jacobian(_rows(y), temperature).reshape(y.shape + y.shape[-1:])

    def softmax_vjp(self, y, dy):
        if not _applies(y, dy):
            return super().softmax_vjp(y, dy)
        return kernels.softmax_vjp(_rows(y), _rows(dy)).reshape(y.shape)

    def log_softmax_vjp(self, logp, dlogp):
        if not _applies(logp, dlogp):
            return super().log_softmax_vjp(logp, dlogp)
        return kernels.log_softmax_vjp(_rows(logp), _rows(dlogp)).reshape(logp.shape)

    def cross_entropy(self, x, tg, *, z_loss, reduction):
        if not _targets_apply(x, tg):
            return super().cross_entropy(x, tg, z_loss=z_loss, reduction=reduction)
        loss = kernels.cross_entropy(_rows(x), *_labels(x, tg), z_loss=z_loss, reduction=reduction, **_options(tg))
        return loss.reshape(x.shape[:-1]) if reduction == "none" else loss

    def cross_entropy_with_grad(self, x, tg, *, z_loss, reduction):
        if not _targets_apply(x, tg):
            return super().cross_entropy_with_grad(x, tg, z_loss=z_loss, reduction=reduction)
        loss, grad = kernels.cross_entropy_with_grad(
            _rows(x), *_labels(x, tg), z_loss=z_loss, reduction=reduction, **_options(tg)
        )
        return (loss.reshape(x.shape[:-1]) if reduction == "none" else loss), grad.reshape(x.shape)


def _targets_apply(x, tg):
    extras = [a for a in (tg.soft, tg.weight) if a is not None]
    return isinstance(tg.labels, np.ndarray) and _applies(x, *extras)


def _labels(x, tg):
    return (_rows(tg.soft),) if tg.soft is not None else (np.ravel(tg.labels),)


def _options(tg):
    weight = None if tg.weight is None else np.ascontiguousarray(tg.weight)
    return {"weight": weight, "ignore_index": tg.ignore_index, "label_smoothing": tg.label_smoothing}
