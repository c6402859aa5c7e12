"""The NumPy backend: primitives on the last axis, computed with NumPy."""

import numpy as np

from .._errors import SoftgradError
from ._base import Backend
from ._numpy_kernels import KernelRouting


def _finfo(dtype_name):
    try:
        return np.finfo(dtype_name)
    except (TypeError, ValueError):
        # bfloat16 arrays come from ml_dtypes, which knows their range
        import ml_dtypes

        return ml_dtypes.finfo(dtype_name)


class NumpyBackend(KernelRouting, Backend):
    name = "numpy"

    # -- conversion ------------------------------------------------------

    def asarray(self, value):
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, (list, tuple, int, float)):
            # Python numbers and lists mean float64 logits, even if they
            # happen to be written as integers.
            return np.asarray(value, dtype=np.float64)
        return np.asarray(value)

    def as_labels(self, value):
        return value if isinstance(value, np.ndarray) else np.asarray(value)

    def dtype_name(self, a):
        return a.dtype.name

    def dtype_kind(self, a):
        """'f' float, 'i' integer (signed or not), 'b' bool, 'c' complex, '?' other."""
        if a.dtype.name == "bfloat16":
            return "f"
        kind = a.dtype.kind
        return {"u": "i"}.get(kind, kind if kind in "fibc" else "?")

    def cast(self, a, dtype_name):
        return a.astype(dtype_name, copy=False)

    def cast_to(self, a, dtype):
        return np.asarray(a, dtype=dtype)

    def cast_like(self, a, like):
        return a.astype(like.dtype)

    def shape(self, a):
        return tuple(a.shape)

    def moveaxis(self, a, source, destination):
        return np.moveaxis(a, source, destination)

    def broadcast_like(self, a, like):
        return np.broadcast_to(a, like.shape)

    def reshape(self, a, shape):
        return np.reshape(a, shape)

    def require(self, ok, message, values):
        """Raise SoftgradError unless ``ok`` holds everywhere, naming the first bad value."""
        ok = np.asarray(ok)
        if ok.all():
            return
        values = np.broadcast_to(np.asarray(values), ok.shape)
        bad = np.argwhere(~ok)
        first = tuple(int(i) for i in bad[0])
        where = f" at position {first}" if first else ""
        more = f" ({len(bad)} bad entries in all)" if len(bad) > 1 else ""
        raise SoftgradError(message(f"{values[first].item()!r}{where}{more}"))

    def quiet(self):
        # inf - inf and 0 * inf are handled by masks; the warnings NumPy
        # raises while evaluating the unselected branch are noise.
        return np.errstate(all="ignore")

    # -- elementwise -------------------------------------------------------

    exp = staticmethod(np.exp)
    log1p = staticmethod(np.log1p)
    expm1 = staticmethod(np.expm1)
    square = staticmethod(np.square)
    where = staticmethod(np.where)
    logical_and = staticmethod(np.logical_and)
    zeros_like = staticmethod(np.zeros_like)
    ones_like = staticmethod(np.ones_like)
    expand_dims = staticmethod(np.expand_dims)

    def stop_gradient(self, a):
        return a

    def saturate(self, a):
        """Clip from below at the most negative finite float; NaN stays NaN."""
        return np.maximum(a, np.finfo(a.dtype).min)

    def saturate_to(self, a, dtype_name):
        """Clip finite values into the range of ``dtype_name``; inf and NaN kept."""
        big = float(_finfo(dtype_name).max)
        return np.where(np.isinf(a), a, np.clip(a, -big, big))

    # -- rows --------------------------------------------------------------

    def rowsum(self, a):
        return np.sum(a, axis=-1, keepdims=True)

    def rowmax(self, a):
        return np.max(a, axis=-1, keepdims=True, initial=-np.inf)

    def argmax_index(self, a):
        """Index of each row's first maximum, shape (..., 1); 0 when C = 0."""
        if a.shape[-1] == 0:
            return np.zeros(a.shape[:-1] + (1,), dtype=np.intp)
        return np.argmax(a, axis=-1)[..., None]

    def take(self, v, index):
        """v at a per-row index, shape (..., 1); 0 when C = 0."""
        if v.shape[-1] == 0:
            return np.zeros(v.shape[:-1] + (1,), dtype=v.dtype)
        return np.take_along_axis(v, index, axis=-1)

    def add_at(self, a, index, value):
        """a with value added at a per-row index (..., 1); a copy."""
        if a.shape[-1] == 0:
            return a
        return self.put_at(a, index, np.take_along_axis(a, index, axis=-1) + value)

    def put_at(self, a, index, value):
        """a with value put at a per-row index (..., 1); a copy."""
        if a.shape[-1] == 0:
            return a
        out = np.array(a, copy=True)
        np.put_along_axis(out, index, np.broadcast_to(value, index.shape), axis=-1)
        return out

    def lookup(self, table, index):
        return table[index]

    def index_mask(self, index, like):
        return np.arange(like.shape[-1]) == index

    def eye_like(self, y):
        return np.eye(y.shape[-1], dtype=y.dtype)

    def one_hot(self, labels, n_classes, dtype):
        return (np.arange(n_classes) == labels[..., None]).astype(dtype)

    def ones_bool(self, labels):
        return np.ones(labels.shape, dtype=bool)

    def count_rows(self, y):
        return float(np.prod(y.shape[:-1]))

    def total(self, a):
        return np.sum(a)

NUMPY = NumpyBackend()
