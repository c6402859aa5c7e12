"""softmax and log_softmax: values against the oracle, identities, masks, temperature."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle
import softgrad as sg
from strategies import BACKEND_DTYPES, NUMPY_DTYPES, TF_DTYPES, cast, logits, on_backend, shape_and_axis
from tolerances import assert_close, assert_no_worse_than_naive, spread, to_float64

FUNCTIONS = {"softmax": (sg.softmax, oracle.softmax), "log_softmax": (sg.log_softmax, oracle.log_softmax)}


def check(name, actual, x, dtype, *, axis=-1, temperature=1.0, where=None):
    """actual == the oracle's name(x), to the derived tolerance of this op."""
    expected = FUNCTIONS[name][1](x, axis, temperature, where)
    if name == "log_softmax":
        # a present entry's log-probability below the float64 range (the
        # oracle's -inf) saturates: finite logits give finite results
        present = np.isfinite(x) if where is None else np.isfinite(x) & where
        expected = np.where(present & (expected == -np.inf), -np.finfo(np.float64).max, expected)
    terms = np.shape(x)[axis] if np.ndim(x) else 1
    z = spread(x, dtype=dtype, axis=axis, temperature=temperature, where=where)
    # softmax keeps componentwise relative precision; log-softmax's absolute
    # error is relative to 1 + |log p| (see tolerances.py).
    scale = expected if name == "softmax" else 1 + np.abs(np.where(np.isfinite(expected), expected, 0))
    assert_close(actual, expected, dtype=dtype, terms=terms, spread=z, scale=scale, err_msg=name)


@pytest.mark.parametrize("name", FUNCTIONS)
@given(data=st.data(), dtype=st.sampled_from(NUMPY_DTYPES), temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_numpy_matches_oracle(name, data, dtype, temperature):
    shape, axis = data.draw(shape_and_axis())
    x = data.draw(logits(dtype, shape))
    out = FUNCTIONS[name][0](cast(x, dtype), axis=axis, temperature=temperature)
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype)
    check(name, out, x, dtype, axis=axis, temperature=temperature)


@pytest.mark.parametrize("name", FUNCTIONS)
@given(data=st.data(), dtype=st.sampled_from(TF_DTYPES))
def test_tensorflow_matches_oracle(tf, name, data, dtype):
    shape, axis = data.draw(shape_and_axis(max_dims=3))
    x = data.draw(logits(dtype, shape))
    out = FUNCTIONS[name][0](tf.constant(cast(x, dtype)), axis=axis)
    assert isinstance(out, tf.Tensor) and out.dtype.name == dtype
    check(name, out, x, dtype, axis=axis)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", TF_DTYPES)
def test_tensorflow_modes(tf, tf_run, name, dtype):
    rng = np.random.default_rng(0)
    x = cast(rng.normal(0, 4, (3, 5, 4)), dtype)
    mask = rng.random((5, 4)) < 0.7
    mask[:, 1] = False
    temperature = cast(np.array([[[0.5]], [[1.0]], [[2.5]]]), dtype)
    fn = FUNCTIONS[name][0]
    out = tf_run(lambda a, t: fn(a, axis=1, temperature=t, where=mask), x, temperature)
    assert out.dtype.name == dtype
    check(name, out, x.astype(np.float64), dtype, axis=1, temperature=temperature.astype(np.float64), where=mask)


@pytest.mark.parametrize("name", FUNCTIONS)
@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_rows_sum_to_one(name, data, backend_dtype):
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(min_classes=1))
    x = data.draw(logits(dtype, shape))
    out = to_float64(FUNCTIONS[name][0](on_backend(backend, x, dtype), axis=axis))
    probabilities = out if name == "softmax" else np.exp(out)
    total = probabilities.sum(axis=axis)
    # a row of -inf logits is a row with nothing left: it sums to 0
    expected = np.where(np.all(x == -np.inf, axis=axis), 0.0, 1.0)
    # rounding log p_i by u |log p_i| moves exp(log p_i) by u p_i |log p_i|:
    # the row's sum by u times its entropy
    p = oracle.softmax(x, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=axis)
    out_scale = expected if name == "softmax" else expected + entropy
    assert_close(total, expected, dtype=dtype, terms=shape[axis], scale=1.0, out_scale=out_scale)


@pytest.mark.parametrize("name", FUNCTIONS)
@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_shift_invariance(name, data, backend_dtype):
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis())
    quarters = data.draw(
        st.lists(st.integers(-32, 32), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    )
    x = np.reshape(np.array(quarters, dtype=np.float64) / 4, shape)
    # x + c is exact in dtype: x spans bits 2**-2 .. 2**3 and c = 16 j with
    # |j| <= 2**(p - 8) spans bits 2**4 .. 2**(p - 4), p the significand bits.
    significand_bits = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}[dtype]
    j = data.draw(st.integers(-(2 ** (significand_bits - 8)), 2 ** (significand_bits - 8)))
    shifted = FUNCTIONS[name][0](on_backend(backend, x + 16.0 * j, dtype), axis=axis)
    check(name, shifted, x, dtype, axis=axis)


def test_half_precision_no_worse_than_naive():
    rng = np.random.default_rng(1)
    x16 = rng.normal(0, 3, (64, 10)).astype(np.float16)
    naive = np.exp(x16 - x16.max(axis=-1, keepdims=True))
    naive = naive / naive.sum(axis=-1, keepdims=True)
    expected = oracle.softmax(x16.astype(np.float64))
    terms, z = 10, spread(x16, dtype="float16")
    assert naive.dtype == np.float16
    assert_no_worse_than_naive(sg.softmax(x16), naive, expected, dtype="float16", terms=terms,
                               spread=z, scale=expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tensorflow_half_precision_no_worse_than_naive(tf, tf_run, dtype):
    x = cast(np.random.default_rng(2).normal(0, 3, (64, 10)), dtype)

    def both(a):
        e = tf.exp(a - tf.reduce_max(a, axis=-1, keepdims=True))
        return sg.softmax(a), e / tf.reduce_sum(e, axis=-1, keepdims=True)

    ours, naive = tf_run(both, x)
    expected = oracle.softmax(x.astype(np.float64))
    assert naive.dtype.name == dtype and ours.dtype.name == dtype
    assert_no_worse_than_naive(ours, naive, expected, dtype=dtype, terms=10, spread=spread(x, dtype=dtype),
                               scale=expected)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_mask_matches_minus_inf(name, axis):
    """A masked entry and a -inf logit are the same thing; a fully masked row is 0 / -inf."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (4, 5, 3))
    mask = rng.random(x.shape) < 0.6
    np.moveaxis(mask, axis, -1)[0, 0] = False
    fn = FUNCTIONS[name][0]
    masked = fn(x, axis=axis, where=mask)
    with_inf = fn(np.where(mask, x, -np.inf), axis=axis)
    for out in (masked, with_inf):
        check(name, out, x, "float64", axis=axis, where=mask)
        assert not np.isnan(out).any()
    empty_row = np.moveaxis(masked, axis, 0)[:, np.all(~np.moveaxis(mask, axis, 0), axis=0)]
    assert empty_row.size and np.all(empty_row == (0.0 if name == "softmax" else -np.inf))


def test_mask_broadcasts():
    x = np.arange(12.0).reshape(3, 4)
    keep = np.array([True, False, True, True])
    check("softmax", sg.softmax(x, where=keep), x, "float64", where=np.broadcast_to(keep, x.shape))


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize(
    "shape, axis, temperature_shape",
    [((4, 3), -1, (4, 1)), ((4, 3), 0, (1, 3)), ((2, 3, 5), 1, (2, 1, 5)), ((2, 3, 5), -1, (1, 1)), ((2, 3, 5), 2, ())],
)
def test_temperature_arrays(name, shape, axis, temperature_shape):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 3, shape)
    t = rng.uniform(0.3, 3.0, temperature_shape)
    check(name, FUNCTIONS[name][0](x, axis=axis, temperature=t), x, "float64", axis=axis, temperature=t)


def test_temperature_divides_the_shifted_logits():
    """z = (x - max x) / T: a finite x with a tiny T cannot overflow."""
    x = np.array([[1e300, 0.0, -1e300]])
    out = sg.softmax(x, temperature=1e-10)
    np.testing.assert_array_equal(out, [[1.0, 0.0, 0.0]])
    assert np.array_equal(sg.log_softmax(x, temperature=1e-10)[0, :1], [0.0])


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("shape, axis", [((0, 5), -1), ((3, 0), -1), ((2, 0, 3), 1), ((0,), 0), ((4, 1), -1), ((1,), 0)])
def test_empty_and_single_class(name, shape, axis):
    x = np.ones(shape, dtype=np.float32)
    out = FUNCTIONS[name][0](x, axis=axis)
    assert out.shape == shape and out.dtype == np.float32
    if out.size:
        np.testing.assert_array_equal(out, 1.0 if name == "softmax" else 0.0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_python_lists_and_ints_become_float64(name):
    out = FUNCTIONS[name][0]([[1, 2, 3], [0.5, 0.5, 0.5]])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    check(name, out, np.array([[1, 2, 3], [0.5, 0.5, 0.5]], dtype=np.float64), "float64")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_tf_variable_and_mixed_inputs(tf, name):
    """A tf.Variable is a tensor; with mixed inputs the framework argument decides."""
    x = np.array([[0.5, -1.0, 2.0], [3.0, 3.0, -4.0]], dtype=np.float32)
    t = tf.constant([[2.0], [0.5]], dtype=tf.float32)
    for out in (FUNCTIONS[name][0](tf.Variable(x)), FUNCTIONS[name][0](x, temperature=t),
                sg.softmax_vjp(x, tf.constant(x)), sg.cross_entropy(x, tf.constant([0, 1]))):
        assert isinstance(out, tf.Tensor) and out.dtype == tf.float32
    check(name, FUNCTIONS[name][0](x, temperature=t), x, "float32", temperature=t.numpy())


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (4, 1)])
def test_tensorflow_empty_and_single_class(tf_run, shape):
    x = np.ones(shape, dtype=np.float32)

    def every(a):
        y, logp = sg.softmax(a), sg.log_softmax(a)
        return y, logp, sg.softmax_vjp(y, a), sg.log_softmax_vjp(logp, a), sg.softmax_jacobian(a)

    y, logp, vjp, log_vjp, jac = tf_run(every, x)
    assert y.shape == logp.shape == vjp.shape == log_vjp.shape == shape and jac.shape == shape + shape[-1:]
    np.testing.assert_array_equal(y, 1.0)
    np.testing.assert_array_equal(logp, 0.0)
    np.testing.assert_array_equal(vjp, 0.0)
    np.testing.assert_array_equal(log_vjp, 0.0)
