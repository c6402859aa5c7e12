"""The one tolerance table of the test suite, and the helpers that apply it.

Every comparison with the float64 oracle (tests/oracle.py) goes through
:func:`assert_close`. Its bound is derived, not tuned:

    |actual - expected| <= u_out * |expected|
                           + u_c * (terms + 2 * spread + C0) * scale
                           + atol

``u_c`` is the unit roundoff (eps / 2) of the dtype the arithmetic runs in:
float32 for float16/bfloat16 inputs (they are computed in float32 and
rounded once), the input dtype otherwise. ``u_out`` is the unit roundoff of
that single final rounding: eps / 2 of the output dtype for float16/bfloat16
and 0 for float32/float64, whose final rounding is one of the C0 roundings.

Where the terms come from (standard forward error analysis, Higham,
"Accuracy and Stability of Numerical Algorithms", ch. 3-4):

* ``terms``: a recursive sum of n terms has relative error at most
  (n - 1) u on non-negative terms, and absolute error (n - 1) u * sum|terms|
  in general; pairwise or tree sums (NumPy, TensorFlow, XLA) do better, so
  n u bounds them all. ``terms`` is the total length of the reductions
  along the computation: C for a softmax, C + N for a mean over N examples.
* ``spread``: the shifted logit z = (x - max x) / T is rounded twice
  (subtraction, division), an absolute error of at most 2 u |z|, which
  exp turns into a relative error of 2 u |z|. ``spread`` is max |z| over the
  data under test, so this term is computed from the test's own inputs.
* ``C0 = 16``: the few remaining elementary roundings of the longest
  closed form (subtract, multiply, divide, log1p, final rounding: about 6),
  plus exp/log/log1p, which are not correctly rounded: glibc and XLA's
  vectorised float32 polynomials stay within 2 ulp = 4 u each, and a formula
  calls at most two of them (6 + 2 * 4 = 14 <= 16).
* ``scale``: the magnitude the error is relative to, given by each test
  from the formula's own derivation (|expected| when the result has
  componentwise relative precision, e.g. y_i * max|dy| for a VJP, whose
  terms are all products of y_i with cotangent entries).
* ``atol``: results in the subnormal range. TensorFlow flushes subnormals
  to zero on CPU, so the smallest normal number of the compute dtype, or half
  the smallest subnormal of the output dtype (the rounding error of a
  subnormal float16 output), whichever is larger.

Half precision carries a second criterion from the project's style guide,
"no worse than the naive computation at the same precision":
:func:`assert_no_worse_than_naive`. Because softgrad rounds once from
float32, each output is the correctly rounded value up to float32 error, and
the naive one-liner (several roundings in the low dtype) cannot land closer
to the truth than the correctly rounded value; so the bound is the naive
error plus twice the float32 error (a float32 result just across a rounding
midpoint moves the rounded output by one ulp, the other side of the truth).

Finite differences have their own derived entries below.
"""

import numpy as np

try:
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - ml_dtypes comes with TensorFlow
    bfloat16 = None

C0 = 16
LOW_PRECISION = ("float16", "bfloat16")


def _finfo(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(bfloat16)
    return np.finfo(np.dtype(name))


def dtype_name(dtype):
    """'float16', 'bfloat16', 'float32' or 'float64', from a NumPy or TF dtype."""
    name = getattr(dtype, "name", None) or np.dtype(dtype).name
    return str(name)


def compute_dtype(dtype):
    name = dtype_name(dtype)
    return "float32" if name in LOW_PRECISION else name


def unit_roundoff(dtype):
    return float(_finfo(dtype_name(dtype)).eps) / 2


def atol(dtype):
    out = _finfo(dtype_name(dtype))
    compute = _finfo(compute_dtype(dtype))
    return max(float(compute.tiny), float(out.smallest_subnormal) / 2)


def bound(dtype, *, terms, spread=0.0, scale=1.0, expected=0.0, out_scale=None):
    """The derived error bound above, elementwise.

    ``out_scale`` (default |expected|) is what the float16/bfloat16 roundings
    are relative to: the single rounding of the output, plus, where a test
    feeds a function with inputs rounded to the low dtype (a VJP's y), the
    first-order effect of rounding those inputs.
    """
    name = dtype_name(dtype)
    u_c = unit_roundoff(compute_dtype(name))
    u_out = unit_roundoff(name) if name in LOW_PRECISION else 0.0
    finite = lambda a: np.abs(np.nan_to_num(np.asarray(a, dtype=np.float64), posinf=0.0, neginf=0.0))
    out_scale = finite(expected if out_scale is None else out_scale)
    return u_out * out_scale + u_c * (terms + 2 * float(spread) + C0) * finite(scale) + atol(name)


def to_float64(a):
    """A float64 NumPy copy of a NumPy array, TF tensor or Python number."""
    if hasattr(a, "numpy"):
        a = a.numpy()
    a = np.asarray(a)
    return a.astype(np.float64)


def assert_close(actual, expected, *, dtype, terms, spread=0.0, scale=None, out_scale=None, err_msg=""):
    """``actual`` (any backend) is within :func:`bound` of the float64 ``expected``.

    Also checks shape, and that non-finite entries (NaN, +-inf) match exactly.
    """
    e = np.asarray(expected, dtype=np.float64)
    # Finite logits give finite results: a true value beyond the dtype's
    # range saturates at +-finfo.max.
    e = _saturated(e, dtype)
    tol = bound(dtype, terms=terms, spread=spread, scale=e if scale is None else scale,
                expected=e, out_scale=out_scale)
    assert_within(actual, e, tol, err_msg=f"({dtype_name(dtype)}, terms={terms}, spread={spread:g}) {err_msg}")


def assert_within(actual, expected, tol, *, err_msg=""):
    """|actual - expected| <= tol elementwise; non-finite entries must match exactly."""
    a = to_float64(actual)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}. {err_msg}"
    finite = np.isfinite(e)
    same_nonfinite = (np.isnan(a) & np.isnan(e)) | (a == e)
    assert np.all(same_nonfinite | finite), (
        f"non-finite entries differ: actual {a[~finite]}, expected {e[~finite]}. {err_msg}"
    )
    tol = np.broadcast_to(tol, e.shape)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(a - np.where(finite, e, 0.0)), 0.0)
    bad = ~(err <= tol)
    if np.any(bad):
        ratio = np.where(bad, np.nan_to_num(err / np.where(tol > 0, tol, 1.0), nan=np.inf), 0.0)
        i = np.unravel_index(np.argmax(ratio), e.shape)
        raise AssertionError(
            f"{int(bad.sum())} of {e.size} entries out of tolerance; worst at {i}: actual {a[i]!r}, "
            f"expected {e[i]!r}, error {err[i]:.3g} > bound {tol[i]:.3g}. {err_msg}"
        )


def _saturated(e, dtype):
    limit = float(_finfo(dtype_name(dtype)).max)
    return np.where(np.isfinite(e) & (np.abs(e) > limit), np.copysign(limit, e), e)


def max_error(actual, expected):
    return float(np.max(np.abs(to_float64(actual) - np.asarray(expected, np.float64)), initial=0.0))


def assert_no_worse_than_naive(actual, naive, expected, *, dtype, terms, spread=0.0, scale):
    """Half precision: softgrad's max error <= the naive one-liner's, up to float32 error."""
    f32 = np.max(bound("float32", terms=terms, spread=spread, scale=scale), initial=0.0)
    ours, theirs = max_error(actual, expected), max_error(naive, expected)
    assert ours <= theirs + 2 * f32, (
        f"{dtype_name(dtype)}: softgrad's error {ours:.3g} exceeds the naive "
        f"computation's {theirs:.3g} (+ float32 slack {2 * f32:.3g})"
    )


def spread(x, *, dtype, axis=-1, temperature=1.0, where=None):
    """The ``spread`` above: max |z|, z = (x - max x) / T, over the unmasked
    entries whose exp(z) does not underflow in the compute dtype. An entry
    that underflows has a true probability below the smallest normal number
    (the row max contributes 1 to the sum), so the atol term covers it."""
    z = to_float64(x)
    if where is not None:
        z = np.where(where, z, -np.inf)
    m = np.max(z, axis=axis, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs((z - m) / to_float64(temperature))
    limit = -np.log(float(_finfo(compute_dtype(dtype)).tiny))
    d = d[np.isfinite(d) & (d <= limit)]
    return float(d.max()) if d.size else 0.0


# Normwise comparisons of two float64 derivative computations (softgrad's
# closed forms against TensorFlow's autodiff of the plain reference) in the
# TF gradient tests, whose inputs have |x| <= 3, T in [1/2, 2], weights,
# label weights and directions in [-1, 2], at most 5 classes and at most
# third derivatives. Every term summed in such a derivative is a product of
# probabilities and weights (<= 2), at most three factors 1/T (<= 8) and at
# most one shifted logit, log-probability or log-sum-exp (<= 12 + log 5 < 7 * 2),
# i.e. at most 8 * 14 = 112: an absolute scale, shared by every entry.
AUTODIFF_SCALE = 112

# Central finite differences in float64, f'(x) ~ (f(x + h) - f(x - h)) / 2h.
# Truncation error h^2/6 * M3, rounding error K u M0 / h, with M_k bounds on
# the k-th derivative along the direction and K = terms + C0 (the function's
# own error, from the table above). The tests use logits with |x| <= 4,
# temperatures >= 1, directions of max-norm 1, at most 8 classes and target
# weights summing to at most 2 per example. Along such a direction the
# derivatives of log-sum-exp are the cumulants of a variable with range <= 2/T,
# so softmax, log-softmax and cross-entropy have M_k <= 2 * k! * (2/T)^k:
# M3 <= 96 for first-order checks and M4 <= 768 for second-order checks (a
# finite difference of a gradient); 800 bounds both.
# h = 2**-17 (exactly representable, so x +- h is exact for |x| <= 4) gives
#   truncation 800 * 2**-34 / 6 = 7.8e-9 and rounding (8 + 16) * 2**-53 * 2**17 = 3.5e-10,
# hence an absolute bound of 8.2e-9 times the scale of the values, max(1, |f|).
FD_STEP = 2.0**-17
FD_ATOL = 8.2e-9

# Second differences (f(x + h d) - 2 f(x) + f(x - h d)) / h^2: truncation
# h^2/12 * M4, rounding 4 K u M0 / h^2, with the same M4 <= 800 and
# K = 8 + 16. h = 2**-13 gives 800 * 2**-26 / 12 = 9.9e-7 and
# 4 * 24 * 2**-53 * 2**26 = 7.2e-7, hence 1.8e-6 times max(1, |f|).
FD2_STEP = 2.0**-13
FD2_ATOL = 1.8e-6
