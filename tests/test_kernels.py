"""The fused kernels against the pure-NumPy path and the float64 oracle.

The public functions route to the kernels whenever they apply, so the whole
suite exercises them; CI runs it a second time with SOFTGRAD_PURE_NUMPY=1.
This file calls the kernels directly, on (rows, C) arrays whose C straddles
the kernels' block size and includes the small-C and odd-C cases, and checks
the switch, the lazy import and the routing itself.
"""

import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle
import softgrad
from softgrad import _maths, kernels
from softgrad.backends import NUMPY
from strategies import cotangents, logits
from test_cross_entropy import check as check_cross_entropy
from tolerances import assert_close, assert_within, spread, unit_roundoff

compiled = pytest.mark.skipif(not kernels.enabled(), reason=f"kernels off: {kernels.status()['reason']}")

DTYPES = ("float32", "float64")
# 256 is the kernels' block length: one block, one block and a tail, a tail
# only; shorter rows go a tile at a time (kernels/_short.py).
CLASSES = st.sampled_from([1, 2, 3, 10, 33, 255, 256, 257, 600])


@st.composite
def rows_and_classes(draw, extreme=True):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 6)), draw(CLASSES))
    x = draw(logits(dtype, shape, extreme=extreme))
    return x.astype(dtype), dtype


def _same_non_finite(actual, expected):
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))


def _pure(fn, *args):
    with np.errstate(all="ignore"):
        return fn(NUMPY, *args)


@compiled
@given(case=rows_and_classes(), temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_softmax(case, temperature):
    x, dtype = case
    out = kernels.softmax(x, temperature)
    assert out.dtype == x.dtype and out.shape == x.shape
    _same_non_finite(out, _pure(_maths.softmax, x, temperature))
    expected = oracle.softmax(x, temperature=temperature)
    assert_close(out, expected, dtype=dtype, terms=x.shape[-1], scale=expected,
                 spread=spread(x, dtype=dtype, temperature=temperature))


@compiled
@given(data=st.data(), temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_log_softmax(data, temperature):
    # x - max(x) overflows before the division by T for logits of both signs
    # near the dtype's max, on every path: extreme logits only with T = 1
    x, dtype = data.draw(rows_and_classes(extreme=temperature == 1.0))
    out = kernels.log_softmax(x, temperature)
    _same_non_finite(out, _pure(_maths.log_softmax, x, temperature))
    expected = oracle.log_softmax(x, temperature=temperature)
    # a present entry whose log-probability underflows float64 saturates
    expected = np.where(np.isfinite(x) & (expected == -np.inf), -np.finfo(np.float64).max, expected)
    scale = 1 + np.abs(np.where(np.isfinite(expected), expected, 0))
    assert_close(out, expected, dtype=dtype, terms=x.shape[-1], scale=scale,
                 spread=spread(x, dtype=dtype, temperature=temperature))


@compiled
@given(case=rows_and_classes(extreme=False), data=st.data())
def test_softmax_vjp(case, data):
    x, dtype = case
    y = oracle.softmax(x)
    dy = data.draw(cotangents(x.shape)).astype(dtype)
    out = kernels.softmax_vjp(y.astype(dtype), dy)
    _same_non_finite(out, _pure(_maths.softmax_vjp, y.astype(dtype), dy))
    # every term of component i is y_i times a cotangent entry (#precision)
    scale = y * np.max(np.abs(dy), axis=-1, keepdims=True)
    assert_close(out, oracle.softmax_vjp(y, dy.astype(np.float64)), dtype=dtype, terms=x.shape[-1], scale=scale)


@compiled
@given(case=rows_and_classes(extreme=False), data=st.data())
def test_log_softmax_vjp(case, data):
    x, dtype = case
    logp = oracle.log_softmax(x)
    dlogp = data.draw(cotangents(x.shape)).astype(dtype)
    out = kernels.log_softmax_vjp(logp.astype(dtype), dlogp)
    _same_non_finite(out, _pure(_maths.log_softmax_vjp, logp.astype(dtype), dlogp))
    assert_close(out, oracle.log_softmax_vjp(logp, dlogp.astype(np.float64)), dtype=dtype,
                 terms=x.shape[-1], scale=np.sum(np.abs(dlogp), axis=-1, keepdims=True))
    # the argmax component is minus the sum of the others
    row_sum = np.sum(out, axis=-1, dtype=np.float64)
    assert np.all(np.abs(row_sum) <= x.shape[-1] * np.finfo(dtype).eps * np.sum(np.abs(out), axis=-1))


@compiled
@given(case=rows_and_classes(extreme=False), temperature=st.sampled_from([1.0, 0.5]))
def test_softmax_jacobian(case, temperature):
    x, dtype = case
    x = x[:, :64]
    y = oracle.softmax(x, temperature=temperature).astype(dtype)
    out = kernels.softmax_jacobian(y, temperature)
    assert out.shape == x.shape + x.shape[-1:]
    np.testing.assert_array_equal(out, _pure(_maths.softmax_jacobian, y, temperature))


def _labels(draw, n_rows, n_classes, ignore_index):
    choices = st.integers(0, n_classes - 1)
    if ignore_index is not None:
        choices = st.one_of(choices, st.just(ignore_index))
    return np.array(draw(st.lists(choices, min_size=n_rows, max_size=n_rows)), dtype=np.int64)


@compiled
@given(
    data=st.data(),
    weighted=st.booleans(),
    ignore_index=st.sampled_from([None, 1, -100]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    z_loss=st.sampled_from([0.0, 1e-3]),
)
def test_cross_entropy_integer_labels(data, weighted, ignore_index, label_smoothing, reduction, z_loss):
    x, dtype = data.draw(rows_and_classes(extreme=False))
    n_rows, n_classes = x.shape
    labels = _labels(data.draw, n_rows, n_classes, ignore_index)
    weight = None
    if weighted:
        # as the public functions do, the weights are cast to the logits' dtype
        drawn = data.draw(st.lists(st.floats(0, 2), min_size=n_classes, max_size=n_classes))
        weight = np.asarray(drawn, dtype=dtype)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss)
    loss, grad = kernels.cross_entropy_with_grad(x, labels, weight=weight, **options)
    assert grad.dtype == x.dtype and np.asarray(loss).dtype == x.dtype
    np.testing.assert_array_equal(kernels.cross_entropy(x, labels, weight=weight, **options), loss)
    weight64 = None if weight is None else weight.astype(np.float64)
    check_cross_entropy(loss, grad, x.astype(np.float64), labels, dtype, weight=weight64, **options)


@compiled
@given(
    data=st.data(),
    weighted=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 1e-2]),
)
def test_cross_entropy_soft_labels(data, weighted, label_smoothing, z_loss):
    x, dtype = data.draw(rows_and_classes(extreme=False))
    n_classes = x.shape[-1]
    raw = data.draw(st.lists(st.floats(0, 1), min_size=x.size, max_size=x.size))
    soft = np.reshape(raw, x.shape).astype(dtype)
    weight = np.linspace(0.5, 1.5, n_classes).astype(dtype) if weighted else None
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, reduction="mean")
    loss, grad = kernels.cross_entropy_with_grad(x, soft, weight=weight, **options)
    weight64 = None if weight is None else weight.astype(np.float64)
    check_cross_entropy(loss, grad, x.astype(np.float64), soft.astype(np.float64), dtype, weight=weight64, **options)


@compiled
@given(case=rows_and_classes(), data=st.data(), label_smoothing=st.sampled_from([0.0, 0.1]),
       z_loss=st.sampled_from([0.0, 1e-3]))
def test_cross_entropy_extreme_logits_match_numpy_path(case, data, label_smoothing, z_loss):
    """With inf, -inf, NaN and huge logits, NaN and inf land where the NumPy path puts them."""
    x, dtype = case
    labels = _labels(data.draw, *x.shape, None)
    tg = _maths.targets(NUMPY, labels, x.shape[-1], x.dtype, soft=False, weight=None,
                        ignore_index=None, label_smoothing=label_smoothing)
    loss, grad = kernels.cross_entropy_with_grad(x, labels, label_smoothing=label_smoothing,
                                                 z_loss=z_loss, reduction="none")
    with np.errstate(all="ignore"):
        expected_loss, expected_grad = super(type(NUMPY), NUMPY).cross_entropy_with_grad(
            x, tg, z_loss=z_loss, reduction="none")
    _same_non_finite(loss, expected_loss)
    _same_non_finite(grad, expected_grad)


@compiled
@pytest.mark.parametrize("shape", [(65536, 10), (999, 33), (3, 50257), (1000, 1001)])
def test_small_and_odd_class_counts(shape):
    """Against the float64 one-liners; the oracle's explicit Jacobians would not fit."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(0.0, 4.0, shape).astype(np.float32)
    x[0, 0] = 60.0
    labels = rng.integers(0, shape[1], shape[0])
    x64, rows = x.astype(np.float64), np.arange(shape[0])
    p = oracle.softmax(x64)
    one_hot = np.zeros(shape)
    one_hot[rows, labels] = 1.0
    at_max = np.zeros(shape)
    at_max[rows, np.argmax(x64, axis=-1)] = 1.0
    terms, z = shape[1] + shape[0], spread(x, dtype="float32")
    loss, grad = kernels.cross_entropy_with_grad(x, labels)
    log_p = np.log(p[rows, labels])
    assert_close(loss, -np.mean(log_p), dtype="float32", terms=terms, spread=z, scale=np.mean(1 + np.abs(log_p)))
    assert_close(grad, (p - one_hot) / shape[0], dtype="float32", terms=terms, spread=z,
                 scale=(p + one_hot + 2 * at_max) / shape[0])
    assert_close(kernels.softmax(x), p, dtype="float32", terms=shape[1], spread=z, scale=p)


@compiled
def test_confident_rows_keep_relative_precision():
    x = np.array([[0.0, 40.0], [0.0, 40.0]], dtype=np.float32)
    loss, grad = kernels.cross_entropy_with_grad(x, np.array([1, 1]), reduction="none")
    np.testing.assert_allclose(loss, np.exp(-40.0), rtol=1e-6)
    np.testing.assert_allclose(grad[:, 0], np.exp(-40.0), rtol=1e-6)
    np.testing.assert_allclose(grad[:, 1], -np.exp(-40.0), rtol=1e-6)
    y = kernels.softmax(x)
    dx = kernels.softmax_vjp(y, np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(dx[:, 0], np.exp(-40.0), rtol=1e-6)


@compiled
@given(n=st.sampled_from([1, 10, 255, 256, 257, 600, 1024 + 31]), dtype=st.sampled_from(DTYPES), data=st.data())
def test_row_max_and_first_argmax_are_numpys(n, dtype, data):
    from softgrad.kernels._rows import first_argmax, row_max

    # few distinct values: ties within and across the 256-entry blocks
    values = st.sampled_from([-np.inf, -1.0, 0.0, 2.0, np.inf])
    row = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    assert first_argmax(row) == np.argmax(row)
    assert row_max(row) == np.max(row)
    if data.draw(st.booleans()):
        row[data.draw(st.integers(0, n - 1))] = np.nan
        assert first_argmax(row) == 0
        assert np.isnan(row_max(row))


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_is_within_two_ulp_over_its_whole_range(dtype):
    """The kernels' vectorised exp against np.exp computed in float64.

    Within 2 ulp of the result where it is normal (the polynomial's ~1 ulp,
    plus np.exp's own rounding for float64), within 1.5 smallest subnormals
    where it is subnormal (one rounding, and np.exp's), inf past the largest
    float, 0 below the smallest, NaN kept."""
    from numba import njit

    from softgrad.kernels._primitives import exp

    @njit
    def exp_all(z, out):
        for j in range(z.shape[0]):
            out[j] = exp(z[j])

    info = np.finfo(dtype)
    top = np.log(float(info.max))
    bottom = np.log(float(info.smallest_subnormal))
    z = np.concatenate([
        np.linspace(bottom - 2.0, top + 2.0, 1_000_003),
        np.linspace(-1.0, 1.0, 100_001),
        [0.0, -0.0, np.inf, -np.inf, np.nan, top, bottom, float(info.max), float(info.min)],
    ]).astype(dtype)
    out = np.empty_like(z)
    exp_all(z, out)
    with np.errstate(over="ignore", under="ignore"):
        expected = np.exp(z.astype(np.float64) if dtype == "float32" else z)
        rounded = expected.astype(dtype)
    _same_non_finite(out, rounded)
    finite = np.isfinite(rounded)
    error = np.abs(out[finite].astype(np.float64) - expected[finite])
    normal = np.abs(rounded[finite]) >= info.tiny
    spacing = np.spacing(rounded[finite].astype(dtype)).astype(np.float64)
    assert np.all(error[normal] <= 2 * spacing[normal])
    assert np.all(error[~normal] <= 1.5 * float(info.smallest_subnormal))


@compiled
def test_prefer_wide_vectors_marks_its_caller():
    """The mark is LLVM's attribute on the function that calls it; with it a
    loop is vectorised with 512-bit registers where the CPU has them."""
    import llvmlite.binding as llvm
    from numba import njit

    from softgrad.kernels._primitives import prefer_wide_vectors

    @njit
    def double(a):
        prefer_wide_vectors()
        for j in range(a.shape[0]):
            a[j] = a[j] * a.dtype.type(2)

    a = np.arange(1000, dtype=np.float32)
    double(a)
    assert np.array_equal(a, 2 * np.arange(1000, dtype=np.float32))
    signature = double.signatures[0]
    assert '"prefer-vector-width"="512"' in double.inspect_llvm(signature)
    if llvm.get_host_cpu_features().get("avx512f"):
        assert "zmm" in double.inspect_asm(signature)


@compiled
def test_nonnegative_tells_llvm_and_returns_its_argument():
    """``nonnegative(j)`` is j, with an ``llvm.assume`` that it is not
    negative (which lets a loop drop numba's wrap-around of negative
    indices); it takes signed integers only."""
    from numba import njit
    from numba.core.errors import TypingError

    from softgrad.kernels._primitives import nonnegative

    @njit
    def window(a, start, out):
        for k in range(out.shape[0]):
            out[k] = a[nonnegative(start + k)]

    a = np.arange(100, dtype=np.float32)
    out = np.empty(40, np.float32)
    window(a, 37, out)
    np.testing.assert_array_equal(out, a[37:77])
    assert "llvm.assume" in window.inspect_llvm(window.signatures[0])

    @njit
    def of_float(x):
        return nonnegative(x)

    with pytest.raises(TypingError):
        of_float(1.5)


def _aligned_like(x, offset):
    """An uninitialised array like x whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    return raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes, offset", [(512, 0), (600, 0), (1024 + 16, 0), (512, 16), (255 + 256, 0)])
def test_streamed_outputs_equal_cached_ones(dtype, n_classes, offset):
    """The streaming stores of large outputs (``_rows.stream_row``) write what
    ordinary stores write, on rows that start on a 64-byte boundary and on
    rows that do not, in one band or several; the softmax and its VJP also
    across their overlapped writes of the previous row.

    The Jacobian must be equal bit for bit. The others take a row sum,
    which the streamed and the cached versions of a kernel compute with
    the same loop, but LLVM may vectorise it differently in each and so
    add in another order. Each order's error is at most (C - 1) u Σ|terms|
    (tests/tolerances.py), so the two sums differ by at most 2 C u Σ|terms|,
    carried through each output's formula below (plus two roundings)."""
    from softgrad.kernels import _softmax

    x = np.random.default_rng(n_classes).normal(0.0, 4.0, (7, n_classes)).astype(dtype)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(dtype)
    y = kernels.softmax(x)
    u, big = unit_roundoff(dtype), 2 * n_classes * unit_roundoff(dtype)
    d = dy.astype(np.float64) - np.take_along_axis(dy, np.argmax(y, axis=-1)[:, None], -1)
    runs = {
        # y = e / s: s relative to itself
        "softmax": (lambda out, *options: _softmax.softmax(x, None, out, *options),
                    lambda cached: (big + 2 * u) * np.abs(cached)),
        # z - log1p(Σ_{z<0} e^z + n_top - 1): that sum relative to itself, so the log moves by at most 2 C u
        "log_softmax": (lambda out, *options: _softmax.log_softmax(x, None, np.finfo(dtype).min, out, *options),
                        lambda cached: big + 2 * u * np.abs(cached)),
        # y (d - Σ d y): the sum relative to Σ|d y|
        "softmax_vjp": (lambda out, *options: _softmax.softmax_vjp(y, dy, out, *options),
                        lambda cached: big * np.abs(y) * np.sum(np.abs(d * y), -1, keepdims=True)
                        + 2 * u * np.abs(cached)),
    }
    like = {name: x for name in runs}
    for t in (None, x.dtype.type(2.0)):
        runs[f"softmax_jacobian T={t}"] = (
            lambda out, *options, t=t: _softmax.softmax_jacobian(y, t, out, *options), lambda cached: 0.0)
        like[f"softmax_jacobian T={t}"] = np.empty(x.shape + x.shape[-1:], dtype)
    for name, (run, tolerance) in runs.items():
        cached = np.full_like(like[name], np.nan)
        run(cached, False, 2)
        for n_bands in (1, 3):
            streamed = _aligned_like(like[name], offset)
            streamed[...] = np.nan
            run(streamed, True, n_bands)
            assert_within(streamed, cached, tolerance(cached.astype(np.float64)), err_msg=name)


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [3, 16, 31, 32, 33, 63, 64, 65, 255, 256, 257, 496, 511, 512, 520])
def test_streamed_jacobian_writes_each_entry_once_and_nothing_else(dtype, n_classes):
    """The streamed Jacobian (``_softmax._stream_jacobian_row``) writes the
    lines that begin in each output row, with the next row's first entries,
    and ordinary stores only at a band's two ends. Whatever the row length
    (in whole lines or not, below the streamed minimum), the output's
    offset from a line and the number of bands, it equals the plain
    stores' Jacobian bit for bit and leaves the bytes around the output
    as they were (a stray whole-line store would overwrite them)."""
    from softgrad.kernels import _softmax

    y = kernels.softmax(np.random.default_rng(n_classes).normal(0.0, 3.0, (5, n_classes)).astype(dtype))
    itemsize = y.itemsize
    for t in (None, y.dtype.type(0.5)):
        expected = np.empty(y.shape + (n_classes,), dtype)
        _softmax.softmax_jacobian(y, t, expected, False, 1)
        for offset in (0, itemsize, 32, 64 - itemsize):
            for n_bands in (1, 2, 3, 7):
                raw = np.full(expected.nbytes + 256, 0xAB, np.uint8)
                start = -raw.ctypes.data % 64 + 64 + offset
                out = raw[start : start + expected.nbytes].view(dtype).reshape(expected.shape)
                _softmax.softmax_jacobian(y, t, out, True, n_bands)
                np.testing.assert_array_equal(out, expected, err_msg=f"T={t} offset={offset} bands={n_bands}")
                assert (raw[:start] == 0xAB).all() and (raw[start + expected.nbytes :] == 0xAB).all()


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_are_streamed_from_their_first_64_byte_boundary(dtype):
    """``stream_plan``: the entries before a row's first 64-byte boundary,
    then the full blocks after it; nothing for a row that ends before its
    first boundary or lies off its own alignment."""
    from softgrad.kernels._rows import BLOCK, stream_plan

    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(4 * BLOCK * itemsize + 128, np.uint8)
    base = -raw.ctypes.data % 64
    for offset in range(0, 64, itemsize):
        for length in (0, 3, BLOCK, 3 * BLOCK + 5):
            row = raw[base + offset : base + offset + length * itemsize].view(dtype)
            head = (64 - offset) % 64 // itemsize
            expected = (head, (length - head) // BLOCK) if head <= length else (0, 0)
            assert stream_plan(row) == expected, (offset, length)
    off_alignment = raw[base + 1 : base + 1 + BLOCK * itemsize].view(dtype)
    assert stream_plan(off_alignment) == (0, 0)


@compiled
@pytest.mark.parametrize("n_classes", [1, 3, 300])
def test_log_softmax_vjp_keeps_a_nan_at_the_argmax(n_classes):
    # Regression: the argmax entry is minus the sum of the others, which
    # turned a NaN there into a finite number (into 0 for one class).
    logp = np.full((2, n_classes), -3.0)
    logp[:, 0] = np.nan
    g = np.random.default_rng(0).normal(size=logp.shape)
    out = kernels.log_softmax_vjp(logp, g)
    expected = _pure(_maths.log_softmax_vjp, logp, g)
    _same_non_finite(out, expected)
    assert np.isnan(out[:, 0]).all()


@compiled
def test_empty_and_poisoned_rows():
    x = np.array([[-np.inf, -np.inf, -np.inf], [1.0, np.nan, -np.inf], [np.inf, 0.0, -np.inf]])
    np.testing.assert_array_equal(kernels.softmax(x)[0], 0.0)
    assert np.isnan(kernels.softmax(x)[1:]).all()
    np.testing.assert_array_equal(kernels.log_softmax(x)[0], -np.inf)
    _, grad = kernels.cross_entropy_with_grad(x, np.array([0, 0, 1]), reduction="none")
    np.testing.assert_array_equal(grad[0], 0.0)
    assert np.isnan(grad[1:, :2]).all()


@compiled
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_an_overflowing_loss_is_inf_without_a_warning(reduction):
    """z_loss squares the log-sum-exp of a saturated float32 row: the float64
    loss is beyond float32 and rounds to inf, quietly, as on the NumPy path."""
    x = np.array([[3e38, -3e38, 0.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = kernels.cross_entropy_with_grad(x, np.array([1]), z_loss=1.0, reduction=reduction)
    assert np.all(np.isposinf(loss))


def test_status_names_the_path():
    status = kernels.status()
    assert status["path"] in ("numba", "numpy") and status["reason"]
    assert kernels.enabled() == (status["path"] == "numba")


def _run(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return result.stdout.strip()


def test_environment_switch_forces_numpy():
    out = _run("from softgrad import kernels; print(kernels.status())", SOFTGRAD_PURE_NUMPY="1")
    assert "'path': 'numpy'" in out and "SOFTGRAD_PURE_NUMPY" in out


def test_numba_is_imported_on_first_use_only():
    code = (
        "import sys, numpy as np, softgrad\n"
        "before = 'numba' in sys.modules\n"
        "softgrad.softmax(np.ones((2, 3)))\n"
        "print(before, 'numba' in sys.modules)"
    )
    numba_installed = importlib.util.find_spec("numba") is not None
    assert _run(code, SOFTGRAD_PURE_NUMPY="0") == f"False {numba_installed}"


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes, offset", [(512, 0), (600, 16)])
@pytest.mark.parametrize("options", [dict(), dict(weighted=True, eps=0.1, ignore=3, z_loss=1e-3)])
def test_streamed_cross_entropy_gradient_equals_cached_one(dtype, n_classes, offset, options):
    from softgrad.kernels import _cross_entropy

    rng = np.random.default_rng(n_classes)
    x = rng.normal(0.0, 4.0, (7, n_classes)).astype(dtype)
    x[2, 5] = 30.0  # a confident row: its max entry is written apart
    x[4, :7] = -np.inf  # absent entries
    labels = rng.integers(0, n_classes, 7)
    labels[1] = 3
    eps = options.get("eps", 0.0)
    weight = rng.uniform(0.5, 2.0, n_classes).astype(dtype) if options.get("weighted") else None
    ignore = options.get("ignore", np.iinfo(np.int64).min)
    a, b = x.dtype.type(1 - eps), x.dtype.type(eps / n_classes)
    _assert_streamed_equals_cached(
        lambda loss, grad, stream, n_bands: _cross_entropy.with_labels(
            x, labels, weight, ignore, a, b, options.get("z_loss", 0.0), 1.0 / 7, np.finfo(dtype).min, loss, grad,
            stream, n_bands),
        x, offset, weight, options.get("z_loss", 0.0))


def _assert_streamed_equals_cached(run, x, offset, weight, z_loss):
    """``run(loss, grad, stream, n_bands)``, a cross-entropy kernel on x's 7
    rows (scale 1/7), gives the same loss and gradient with ordinary stores
    (2 bands) and streamed into rows ``offset`` bytes past a line (1 and 3
    bands), up to the order of the row sum S = Σ e^z.

    LLVM may vectorise the same sum differently at the kernel's streamed
    and unstreamed call sites. Each order's error is at most (C - 1) u S,
    so the two S differ by at most 2 C u S: the log-sum-exp by 2 C u, and
    p = e^z / S by 2 C u p. The loss (Σq lse - Σ q z + z_loss lse²) / 7 and
    the gradient ((Σq + 2 z_loss lse) p - q) / 7 then move by at most
    2 C u (Σq + 2 z_loss |lse|) / 7 (times p for the gradient), with Σq
    at most the largest weight, plus two roundings of the result."""
    results = []
    for stream, n_bands, grad in [(False, 2, np.full_like(x, np.nan)), (True, 1, _aligned_like(x, offset)),
                                  (True, 3, _aligned_like(x, offset))]:
        loss = np.zeros(7)
        run(loss, grad, stream, n_bands)
        results.append((loss, grad))
    x64 = x.astype(np.float64)
    top = x64.max(-1, keepdims=True)
    lse = top + np.log(np.exp(x64 - top).sum(-1, keepdims=True))
    u = unit_roundoff(x.dtype)
    w_max = 1.0 if weight is None else float(np.max(weight))
    moved = 2 * x.shape[1] * u * (w_max + 2 * z_loss * np.abs(lse)) / 7
    for loss, grad in results[1:]:
        assert_within(loss, results[0][0], moved[:, 0] + 2 * u * np.abs(results[0][0]), err_msg="loss")
        assert_within(grad, results[0][1], moved * np.exp(x64 - lse) + 2 * u * np.abs(results[0][1].astype(np.float64)),
                      err_msg="grad")


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes, offset", [(512, 0), (600, 16)])
@pytest.mark.parametrize("options", [dict(), dict(weighted=True, eps=0.1, z_loss=1e-3)])
def test_streamed_soft_label_gradient_equals_cached_one(dtype, n_classes, offset, options):
    from softgrad.kernels import _cross_entropy

    rng = np.random.default_rng(n_classes + 1)
    x = rng.normal(0.0, 4.0, (7, n_classes)).astype(dtype)
    x[2, 5] = 30.0  # a confident row: its max entry is written apart
    x[4, :7] = -np.inf  # absent entries
    soft = rng.uniform(0.0, 1.0, x.shape)
    soft[3] = 0.0
    soft[3, 5] = 1.0  # a one-hot row among dense ones
    soft = (soft / soft.sum(-1, keepdims=True)).astype(dtype)
    eps = options.get("eps", 0.0)
    weight = rng.uniform(0.5, 2.0, n_classes).astype(dtype) if options.get("weighted") else None
    a, b = x.dtype.type(1 - eps), x.dtype.type(eps / n_classes)
    _assert_streamed_equals_cached(
        lambda loss, grad, stream, n_bands: _cross_entropy.with_soft_labels(
            x, soft, weight, a, b, options.get("z_loss", 0.0), 1.0 / 7, np.finfo(dtype).min, loss, grad, stream,
            n_bands),
        x, offset, weight, options.get("z_loss", 0.0))


@compiled
def test_the_long_row_kernels_can_be_cached(tmp_path):
    """A kernel numba cannot cache is compiled again in every process (seconds
    on the first call). Regression: a division that could raise, in a
    function passed on as a first-class function, made log_softmax with a
    temperature uncacheable."""
    code = (
        "import warnings, numpy as np\n"
        "from numba.core.errors import NumbaWarning\n"
        "warnings.simplefilter('error', NumbaWarning)\n"
        "from softgrad import kernels\n"
        "from softgrad.kernels import _softmax\n"
        "x = np.random.default_rng(0).normal(size=(3, 300))\n"
        "for t in (1.0, 2.0):\n"
        "    for dtype in ('float32', 'float64'):\n"
        "        a = x.astype(dtype); out = np.empty_like(a); t_ = None if t == 1.0 else a.dtype.type(t)\n"
        "        _softmax.softmax(a, t_, out, True, 2)\n"
        "        _softmax.log_softmax(a, t_, np.finfo(dtype).min, out, True, 2)\n"
        "        _softmax.softmax_vjp(a, a, out, True, 2)\n"
        "        _softmax.softmax_jacobian(a, t_, np.empty(a.shape + a.shape[-1:], dtype), True, 2)\n"
        "        kernels.cross_entropy_with_grad(a, np.arange(3))\n"
        "        kernels.cross_entropy_with_grad(a, np.full_like(a, 1 / 300))\n"
        "print('cached')"
    )
    assert _run(code, NUMBA_CACHE_DIR=str(tmp_path)) == "cached"


# A first call in a process with an empty cache: cross-entropy's kernel (and
# the softmax's, which it does not use) with the gradient, float64, long rows.
_FIRST_CALL = """
import sys, numpy as np
from softgrad import kernels
from softgrad.kernels import _apart, _cross_entropy
if sys.argv[1] == "no-child":
    _apart.PYTHON = sys.executable + "-missing"
rng = np.random.default_rng(0)
x, labels = rng.normal(0, 2, (5, 300)), rng.integers(0, 300, 5)
loss, grad = kernels.cross_entropy_with_grad(x, labels)
np.save(sys.argv[2], grad)
hits = sum(_cross_entropy.with_labels.stats.cache_hits.values())
print(hits, len(_cross_entropy._grad_row.overloads), loss)
"""


def _first_call(tmp_path, mode):
    out = tmp_path / f"{mode}.npy"
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL, mode, str(out)], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / mode)}, check=True)
    hits, helpers, loss = result.stdout.split()
    return int(hits), int(helpers), float(loss), np.load(out)


def _check_first_call(loss, grad):
    rng = np.random.default_rng(0)
    x, labels = rng.normal(0, 2, (5, 300)), rng.integers(0, 300, 5)
    check_cross_entropy(loss, grad, x, labels, np.float64)


@compiled
@pytest.mark.slow
def test_a_kernel_missing_from_the_cache_is_compiled_in_a_child(tmp_path):
    """The process that calls a kernel first loads it from the cache, which a
    child filled: its helpers are never compiled here, where the kernel's
    calls would bind to them, once-optimised (``kernels/_apart.py``)."""
    hits, helpers, loss, grad = _first_call(tmp_path, "child")
    assert (hits, helpers) == (1, 0)
    _check_first_call(loss, grad)


@compiled
@pytest.mark.slow
def test_without_a_child_the_kernel_is_compiled_here(tmp_path):
    hits, helpers, loss, grad = _first_call(tmp_path, "no-child")
    assert hits == 0 and helpers > 0
    _check_first_call(loss, grad)


@pytest.fixture
def calls(monkeypatch):
    """Names of the kernels that the public functions call."""
    seen = []
    for name in ("softmax", "log_softmax", "softmax_vjp", "cross_entropy_with_grad"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))
    return seen


@compiled
def test_routing_uses_kernels_where_they_apply(calls):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    y = softgrad.softmax(x, axis=1)
    assert_close(y, oracle.softmax(x, axis=1), dtype="float32", terms=4, scale=oracle.softmax(x, axis=1))
    softgrad.log_softmax(x, temperature=2.0)
    softgrad.softmax_vjp(y, x, axis=1)
    loss, grad = softgrad.cross_entropy_with_grad(x, np.zeros((3, 4), dtype=int))
    assert grad.shape == x.shape
    # float16 is computed in float32, so it takes the float32 kernel
    assert softgrad.softmax(x.astype(np.float16)).dtype == np.float16
    assert calls == ["softmax", "log_softmax", "softmax_vjp", "cross_entropy_with_grad", "softmax"]


def test_routing_falls_back_where_kernels_do_not_apply(calls):
    x = np.random.default_rng(0).normal(size=(3, 5))
    softgrad.softmax(x, where=x > 0)
    softgrad.softmax(x, temperature=np.full((3, 1), 2.0))
    assert calls == []
