"""Argument checks and normalisation, shared by every public function.

Each check raises :class:`SoftgradError` whose message shows the offending
value and what was expected. Checks of values (not shapes) on symbolic
TensorFlow tensors become graph assertions through ``xp.require``.
"""

from ._errors import SoftgradError

REDUCTIONS = ("mean", "sum", "none")
LOW_PRECISION = ("float16", "bfloat16")


def axis(axis, ndim):
    """The class axis as a non-negative int."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise SoftgradError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise SoftgradError(
            f"axis {axis} is out of range for an array with ndim {ndim}; "
            f"expected {-ndim} <= axis < {ndim}"
        )
    return axis % ndim


def floats(xp, value, name):
    """(array in the computing dtype, dtype of the result).

    float16 and bfloat16 are computed in float32 and rounded once at the end.
    """
    a = xp.asarray(value)
    kind = xp.dtype_kind(a)
    dtype = xp.dtype_name(a)
    if kind != "f":
        raise SoftgradError(
            f"{name} must be a floating-point array, got dtype {dtype}; "
            f"convert it first, e.g. x.astype('float32')"
        )
    if dtype in LOW_PRECISION:
        a = xp.cast(a, "float32")
    return a, dtype


def ndim_at_least_1(xp, a, name):
    if len(xp.shape(a)) == 0:
        raise SoftgradError(f"{name} must have at least one axis (the classes), got a scalar")


def temperature(xp, value, x, class_axis):
    """A float, or an array of x's rank whose class axis has size 1."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise SoftgradError(f"temperature must be > 0, got {value!r}")
        return float(value)
    t = xp.cast_to(xp.asarray(value), x.dtype)
    shape, x_shape = xp.shape(t), xp.shape(x)
    if len(shape) > len(x_shape):
        raise SoftgradError(f"temperature of shape {shape} has more axes than x of shape {x_shape}")
    shape = (1,) * (len(x_shape) - len(shape)) + shape
    if shape[class_axis] not in (1, None):
        raise SoftgradError(
            f"temperature of shape {xp.shape(t)} must have size 1 on the class axis "
            f"{class_axis} of x of shape {x_shape}"
        )
    _broadcastable(shape, x_shape, "temperature")
    t = xp.reshape(t, shape)
    xp.require(t > 0, lambda bad: f"temperature must be > 0, got {bad}", t)
    return t


def mask(xp, where, x):
    """A boolean array of x's shape, or None."""
    if where is None:
        return None
    m = xp.as_labels(where)
    if xp.dtype_kind(m) != "b":
        raise SoftgradError(f"where must be a boolean mask, got dtype {xp.dtype_name(m)}")
    _broadcastable(xp.shape(m), xp.shape(x), "where")
    return xp.broadcast_like(m, x)


def _broadcastable(shape, target, name):
    padded = (1,) * (len(target) - len(shape)) + tuple(shape)
    if len(shape) > len(target) or any(
        a not in (1, b) and None not in (a, b) for a, b in zip(padded, target)
    ):
        raise SoftgradError(f"{name} of shape {tuple(shape)} does not broadcast to x of shape {tuple(target)}")


def reduction(value):
    if value not in REDUCTIONS:
        raise SoftgradError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {value!r}")
    return value


def non_negative(value, name, upper=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SoftgradError(f"{name} must be a Python float, got {value!r}")
    if not value >= 0 or (upper is not None and not value <= upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise SoftgradError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def weight(xp, value, n_classes, dtype):
    if value is None:
        return None
    w = xp.cast_to(xp.asarray(value), dtype)
    shape = xp.shape(w)
    if len(shape) != 1 or shape[0] not in (n_classes, None):
        raise SoftgradError(
            f"weight must have shape ({n_classes},), one entry per class, got shape {shape}"
        )
    return w


def labels(xp, value, logits, class_axis, ignore_index):
    """(labels, soft): integer class indices or float class probabilities."""
    y = xp.as_labels(value)
    kind = xp.dtype_kind(y)
    shape, x_shape = xp.shape(y), xp.shape(logits)
    if kind == "f":
        if not _same_shape(shape, x_shape):
            raise SoftgradError(
                f"soft labels must have the logits' shape {x_shape}, got {shape}"
            )
        if ignore_index is not None:
            raise SoftgradError(
                "ignore_index applies to integer labels only; got soft (float) labels "
                f"with ignore_index={ignore_index!r}"
            )
        return y, True
    if kind != "i":
        raise SoftgradError(
            f"labels must be integer class indices or float probabilities, got dtype {xp.dtype_name(y)}"
        )
    expected = x_shape[:class_axis] + x_shape[class_axis + 1 :]
    if not _same_shape(shape, expected):
        raise SoftgradError(
            f"integer labels must have shape {expected} (the logits' shape {x_shape} "
            f"without the class axis {class_axis}), got {shape}"
        )
    n_classes = x_shape[class_axis]
    in_range = (y >= 0) & (y < n_classes) if n_classes is not None else y >= 0
    if ignore_index is not None:
        in_range = in_range | (y == ignore_index)
    allowed = f"[0, {n_classes})" + ("" if ignore_index is None else f" or equal ignore_index={ignore_index}")
    xp.require(in_range, lambda bad: f"labels must be in {allowed}; got {bad}", y)
    return y, False


def _same_shape(a, b):
    return len(a) == len(b) and all(i == j or None in (i, j) for i, j in zip(a, b))


def ignore_index(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise SoftgradError(f"ignore_index must be an int or None, got {value!r}")
    return value
