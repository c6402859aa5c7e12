"""Hypothesis strategies shared by the property tests."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tolerances import _finfo

NUMPY_DTYPES = ("float16", "float32", "float64")
TF_DTYPES = ("bfloat16", "float16", "float32", "float64")
BACKEND_DTYPES = tuple(("numpy", d) for d in NUMPY_DTYPES) + tuple(("tensorflow", d) for d in TF_DTYPES)


def cast(values, dtype):
    """float64 values rounded to dtype, as a NumPy array (ml_dtypes for bfloat16)."""
    with np.errstate(over="ignore"):  # beyond the dtype's range is meant to become inf
        if dtype == "bfloat16":
            from ml_dtypes import bfloat16

            return np.asarray(values).astype(bfloat16)
        return np.asarray(values).astype(dtype)


def on_backend(backend, values, dtype):
    """values rounded to dtype, as a NumPy array or an eager TF tensor."""
    a = cast(values, dtype)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(a)
    return a


@st.composite
def shape_and_axis(draw, max_dims=4, max_side=5, min_classes=0):
    """A shape of 1-4 dims (possibly empty, possibly 1 class) and a class axis."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=0, max_side=max_side))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    if shape[axis] < min_classes:
        shape = shape[: axis % len(shape)] + (min_classes,) + shape[axis % len(shape) + 1 :]
    return shape, axis


def values(dtype, *, extreme=True, bound=30.0):
    """Moderate logits, and with ``extreme`` also +-finfo.max, huge values and -inf."""
    moderate = st.floats(-bound, bound)
    if not extreme:
        return moderate
    big = float(_finfo(dtype).max)
    return st.one_of(
        moderate,
        moderate,
        moderate,
        st.sampled_from([big, -big, big / 4, -big / 4, -np.inf, 1e4, -1e4]),
    )


def logits(dtype, shape, *, extreme=True, bound=30.0):
    """A float64 array whose values are exactly representable in ``dtype``."""
    x = hnp.arrays(np.float64, shape, elements=values(dtype, extreme=extreme, bound=bound))
    return x.map(lambda a: cast(a, dtype).astype(np.float64))


def cotangents(shape):
    return hnp.arrays(np.float64, shape, elements=st.floats(-4, 4))
