"""Jacobians, VJPs and JVPs: the oracle, and the identities that tie them together."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle
import softgrad as sg
from strategies import BACKEND_DTYPES, NUMPY_DTYPES, TF_DTYPES, cast, cotangents, logits, on_backend, shape_and_axis
from tolerances import LOW_PRECISION, _finfo, assert_close, assert_within, bound, spread, to_float64

JACOBIANS = {
    "softmax": (sg.softmax_jacobian, oracle.softmax_jacobian),
    "log_softmax": (sg.log_softmax_jacobian, oracle.log_softmax_jacobian),
}


def jacobian_scale(x, name, axis=-1, temperature=1.0, where=None):
    """What each entry's error is relative to: (s_i delta_ij + s_i s_j) / T for
    softmax, (delta_ij + s_j) / T on the present rows for log-softmax."""
    s = np.moveaxis(oracle.softmax(x, axis, temperature, where), axis, -1)
    t = np.moveaxis(np.broadcast_to(np.asarray(temperature, dtype=np.float64), np.shape(x)), axis, -1)[..., :1, None]
    eye = np.eye(s.shape[-1])
    if name == "softmax":
        return s[..., :, None] * (eye + s[..., None, :]) / t
    masked = np.asarray(x, dtype=np.float64) if where is None else np.where(where, x, -np.inf)
    present = np.moveaxis(masked, axis, -1) > -np.inf
    return present[..., :, None] * (eye + s[..., None, :]) / t


def vjp_scale(y, dy, axis):
    """y_i * 10 max|dy|: with c = dy at the argmax, |dy_i - c - sum y (dy - c)| <= 4 max|dy|,
    and rounding y by a relative u moves the result by at most 6 u y_i max|dy|."""
    return y * 10 * np.max(np.abs(dy), axis=axis, keepdims=True, initial=0)


def log_vjp_scale(logp, g, axis):
    """sum|g| (4 + 2 H), H = sum p |log p|, on the present entries: the terms
    g_i - g_a - sum p (g - g_a) are at most 4 max|g|, and rounding log p by a
    relative u moves p_k by u p_k |log p_k|, the result by at most 2 u H sum|g|."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # 0 * inf where p = 0, discarded
        entropy = np.sum(np.where(p > 0, p * np.abs(logp), 0.0), axis=axis, keepdims=True)
    present = logp > -np.inf
    return present * np.sum(np.abs(np.where(present, g, 0)), axis=axis, keepdims=True) * (4 + 2 * entropy)


@pytest.mark.parametrize("name", JACOBIANS)
@given(data=st.data(), dtype=st.sampled_from(NUMPY_DTYPES), temperature=st.sampled_from([1.0, 0.25, 2.0]))
def test_jacobian_matches_oracle(name, data, dtype, temperature):
    shape, axis = data.draw(shape_and_axis(max_side=4))
    x = data.draw(logits(dtype, shape))
    out = JACOBIANS[name][0](cast(x, dtype), axis=axis, temperature=temperature)
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    assert out.shape == batch + (shape[axis], shape[axis]) and out.dtype == np.dtype(dtype)
    assert_close(out, JACOBIANS[name][1](x, axis, temperature), dtype=dtype, terms=shape[axis],
                 spread=spread(x, dtype=dtype, axis=axis, temperature=temperature),
                 scale=jacobian_scale(x, name, axis, temperature))


@pytest.mark.parametrize("name", JACOBIANS)
@pytest.mark.parametrize("dtype", TF_DTYPES)
def test_jacobian_tensorflow_modes(tf_run, name, dtype):
    rng = np.random.default_rng(10)
    x = cast(rng.normal(0, 2, (5, 2, 3)), dtype).astype(np.float64)
    where = rng.random((5, 2, 3)) < 0.8
    where[:, 1, 2] = False
    t = np.array([[[0.5], [2.0]]])
    out = tf_run(lambda a, tt: JACOBIANS[name][0](a, axis=0, temperature=tt, where=where),
                 cast(x, dtype), cast(t, dtype))
    assert out.shape == (2, 3, 5, 5) and out.dtype.name == dtype
    t = cast(t, dtype).astype(np.float64)
    assert_close(out, JACOBIANS[name][1](x, 0, t, where), dtype=dtype, terms=5,
                 spread=spread(x, dtype=dtype, axis=0, temperature=t, where=where),
                 scale=jacobian_scale(x, name, 0, t, where))
    assert np.all(out[1, 2] == 0), "a fully masked row has a zero Jacobian"


@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_softmax_jacobian_symmetric_with_zero_row_sums(data, backend_dtype):
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(max_side=4))
    x = data.draw(logits(dtype, shape))
    jac = sg.softmax_jacobian(on_backend(backend, x, dtype), axis=axis)
    tol = bound(dtype, terms=shape[axis], spread=spread(x, dtype=dtype, axis=axis),
                scale=jacobian_scale(x, "softmax", axis), expected=to_float64(jac))
    assert_within(jac, np.swapaxes(to_float64(jac), -1, -2), tol + np.swapaxes(tol, -1, -2))
    assert_within(to_float64(jac).sum(axis=-1), np.zeros(jac.shape[:-1]), tol.sum(axis=-1))


@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_log_softmax_jacobian_zero_row_sums(data, backend_dtype):
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(max_side=4))
    x = data.draw(logits(dtype, shape))
    jac = sg.log_softmax_jacobian(on_backend(backend, x, dtype), axis=axis)
    tol = bound(dtype, terms=shape[axis], spread=spread(x, dtype=dtype, axis=axis),
                scale=jacobian_scale(x, "log_softmax", axis), expected=to_float64(jac))
    assert_within(to_float64(jac).sum(axis=-1), np.zeros(jac.shape[:-1]), tol.sum(axis=-1))


def test_jacobian_includes_the_temperature():
    x = np.array([[0.3, -1.2, 2.0]])
    for name, (fn, _) in JACOBIANS.items():
        np.testing.assert_allclose(fn(x, temperature=4.0), fn(x / 4.0) / 4.0, rtol=1e-14, atol=1e-17, err_msg=name)


def _vjp_inputs(data, dtype, kind, max_dims=4):
    """(x, y rounded to dtype, exact y, cotangent, axis) for 'softmax' or 'log_softmax'."""
    shape, axis = data.draw(shape_and_axis(max_dims=max_dims))
    x = data.draw(logits(dtype, shape))
    exact = (oracle.softmax if kind == "softmax" else oracle.log_softmax)(x, axis)
    rounded = cast(exact, dtype)
    # a log-probability that overflows to -inf in dtype is absent for the product
    exact = np.where(rounded.astype(np.float64) == -np.inf, -np.inf, exact)
    return x, rounded, exact, data.draw(cotangents(shape)), axis


def _vjp_tolerance(kind, exact, d, axis, dtype):
    """Bound arguments for a product fed with the exact output rounded to dtype."""
    scale = vjp_scale(exact, d, axis) if kind == "softmax" else log_vjp_scale(exact, d, axis)
    if dtype not in LOW_PRECISION:
        return dict(dtype=dtype, terms=exact.shape[axis], scale=scale)
    # The scale bounds both the output and the effect of rounding the inputs,
    # except that a subnormal y is rounded to an absolute half-spacing, not a
    # relative u: count it as y + smallest_subnormal / (2 u).
    if kind == "softmax":
        info = _finfo(dtype)
        floor = float(info.smallest_subnormal) / float(info.eps)
        out_scale = vjp_scale(exact + floor, d, axis)
    else:
        out_scale = scale
    return dict(dtype=dtype, terms=exact.shape[axis], scale=scale, out_scale=out_scale)


PRODUCTS = {
    ("softmax", "vjp"): (sg.softmax_vjp, oracle.softmax_vjp),
    ("softmax", "jvp"): (sg.softmax_jvp, oracle.softmax_jvp),
    ("log_softmax", "vjp"): (sg.log_softmax_vjp, oracle.log_softmax_vjp),
    ("log_softmax", "jvp"): (sg.log_softmax_jvp, oracle.log_softmax_jvp),
}


@pytest.mark.parametrize("kind, product", PRODUCTS)
@given(data=st.data(), dtype=st.sampled_from(NUMPY_DTYPES))
def test_product_matches_oracle(kind, product, data, dtype):
    x, y, exact, d, axis = _vjp_inputs(data, dtype, kind)
    d = cast(d, dtype)
    out = PRODUCTS[kind, product][0](y, d, axis=axis)
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    d64 = d.astype(np.float64)
    assert_close(out, PRODUCTS[kind, product][1](exact, d64, axis), **_vjp_tolerance(kind, exact, d64, axis, dtype))


@pytest.mark.parametrize("kind, product", PRODUCTS)
@given(data=st.data(), dtype=st.sampled_from(TF_DTYPES))
def test_product_tensorflow_matches_oracle(tf, kind, product, data, dtype):
    x, y, exact, d, axis = _vjp_inputs(data, dtype, kind, max_dims=3)
    d = cast(d, dtype)
    out = PRODUCTS[kind, product][0](tf.constant(y), tf.constant(d), axis=axis)
    assert isinstance(out, tf.Tensor) and out.dtype.name == dtype
    d64 = d.astype(np.float64)
    assert_close(out, PRODUCTS[kind, product][1](exact, d64, axis), **_vjp_tolerance(kind, exact, d64, axis, dtype))


@pytest.mark.parametrize("kind, product", PRODUCTS)
@pytest.mark.parametrize("dtype", TF_DTYPES)
def test_product_tensorflow_modes(tf_run, kind, product, dtype):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 3, (4, 6))
    x[1, :] = -np.inf
    x[2, 3] = -np.inf
    exact = (oracle.softmax if kind == "softmax" else oracle.log_softmax)(x, 0)
    d = cast(rng.normal(0, 1, x.shape), dtype)
    out = tf_run(lambda a, b: PRODUCTS[kind, product][0](a, b, axis=0), cast(exact, dtype), d)
    assert out.dtype.name == dtype and not np.isnan(out).any()
    d64 = d.astype(np.float64)
    assert_close(out, PRODUCTS[kind, product][1](exact, d64, 0), **_vjp_tolerance(kind, exact, d64, 0, dtype))


def _jacobian_product(jac, d, axis, transpose):
    d = np.moveaxis(to_float64(d), axis, -1)
    pattern = "...ij,...i->...j" if transpose else "...ij,...j->...i"
    return np.moveaxis(np.einsum(pattern, to_float64(jac), d), -1, axis)


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_vjp_and_jvp_are_products_with_the_jacobian(kind, data, backend_dtype):
    """VJP = J^T dy and JVP = J dx, with softgrad's own J, from the same x."""
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(max_side=4))
    x = data.draw(logits(dtype, shape))
    xd = on_backend(backend, x, dtype)
    forward = sg.softmax if kind == "softmax" else sg.log_softmax
    out = forward(xd, axis=axis)
    jac = JACOBIANS[kind][0](xd, axis=axis)
    terms, z = shape[axis], spread(x, dtype=dtype, axis=axis)
    jac_tol = bound(dtype, terms=terms, spread=z, scale=jacobian_scale(x, kind, axis), expected=to_float64(jac))
    exact = (oracle.softmax if kind == "softmax" else oracle.log_softmax)(x, axis)
    exact = np.where(to_float64(out) == -np.inf, -np.inf, exact)
    for product in ("vjp", "jvp"):
        d64 = cast(data.draw(cotangents(shape)), dtype).astype(np.float64)
        pattern = "...ij,...i->...j" if product == "vjp" else "...ij,...j->...i"
        via_jacobian = _jacobian_product(jac, d64, axis, transpose=product == "vjp")
        tol_j = np.moveaxis(np.einsum(pattern, jac_tol, np.abs(np.moveaxis(d64, axis, -1))), -1, axis)
        # the product's input is softgrad's own forward output: its error
        # (the spread term, and for half precision its rounding) reaches the
        # product through y
        tol_p = bound(**{**_vjp_tolerance(kind, exact, d64, axis, dtype), "spread": z})
        actual = PRODUCTS[kind, product][0](out, on_backend(backend, d64, dtype), axis=axis)
        assert_within(actual, via_jacobian, tol_j + tol_p, err_msg=f"{kind} {product}")


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES))
def test_vjp_and_jvp_are_adjoint(kind, data, backend_dtype):
    """<dy, J dx> = <J^T dy, dx>, row by row."""
    backend, dtype = backend_dtype
    x, y, exact, dy, axis = _vjp_inputs(data, dtype, kind)
    d64x = cast(data.draw(cotangents(x.shape)), dtype).astype(np.float64)
    d64y = cast(dy, dtype).astype(np.float64)
    vjp, jvp = PRODUCTS[kind, "vjp"][0], PRODUCTS[kind, "jvp"][0]
    y, dx, dy = (on_backend(backend, a, dtype) for a in (y.astype(np.float64), d64x, d64y))
    left = np.sum(d64y * to_float64(jvp(y, dx, axis=axis)), axis=axis)
    right = np.sum(to_float64(vjp(y, dy, axis=axis)) * d64x, axis=axis)
    tol_jvp = bound(**_vjp_tolerance(kind, exact, d64x, axis, dtype))
    tol_vjp = bound(**_vjp_tolerance(kind, exact, d64y, axis, dtype))
    tol = np.sum(np.abs(d64y) * tol_jvp, axis=axis) + np.sum(np.abs(d64x) * tol_vjp, axis=axis)
    assert_within(left, right, tol)


@pytest.mark.parametrize("fn", [sg.softmax_vjp, sg.softmax_jvp, sg.log_softmax_vjp, sg.log_softmax_jvp])
def test_products_never_build_the_jacobian(fn):
    """O(N C) memory: J would take N C^2 * 8 bytes = 1 GiB here."""
    n, c = 8, 4096
    rng = np.random.default_rng(12)
    y = oracle.softmax(rng.normal(size=(n, c)))
    if fn in (sg.log_softmax_vjp, sg.log_softmax_jvp):
        y = np.log(y)
    d = rng.normal(size=(n, c))
    fn(y, d)  # warm-up: lazy imports and kernel compilation are not per-call memory
    tracemalloc.start()
    try:
        fn(y, d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 16 * n * c * 8, f"peak {peak} bytes for inputs of {n * c * 8} bytes"
