"""cross_entropy_hvp: the Hessian of cross_entropy applied to v, in O(N C)."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import oracle
import softgrad as sg
from strategies import BACKEND_DTYPES, TF_DTYPES, cast, cotangents, logits, on_backend, shape_and_axis
from tolerances import assert_close, assert_within, bound, spread


def hvp_scale(x, labels, v, axis=-1, *, weight=None, ignore_index=None, label_smoothing=0.0,
              reduction="mean", z_loss=0.0):
    """factor p_i max|v| (4 S + 10 z (1 + |lse|)): the error scale of
    (S + 2 z lse) p_i (v_i - <p, v>) + 2 z p_i <p, v> with S = sum q, where the
    bracket is evaluated relative to v at the argmax, |.| <= 4 max|v|."""
    xl, q, valid, denominator = oracle._targets(x, labels, axis, weight, ignore_index, label_smoothing)
    p = oracle.softmax(xl)
    lse = np.abs(oracle.logsumexp(xl))[..., None]
    vmax = np.max(np.abs(np.moveaxis(v, axis, -1)), axis=-1, keepdims=True, initial=0)
    scale = p * vmax * (4 * q.sum(-1, keepdims=True) + 10 * z_loss * (1 + lse))
    return np.moveaxis(oracle._reduced(scale, valid, denominator, reduction), -1, axis)


def check(out, x, labels, v, dtype, axis=-1, **options):
    terms = np.shape(x)[axis] + int(np.prod(np.shape(x))) // max(np.shape(x)[axis], 1)
    assert_close(out, oracle.cross_entropy_hvp(x, labels, v, axis, **options), dtype=dtype, terms=terms,
                 spread=spread(x, dtype=dtype, axis=axis), scale=hvp_scale(x, labels, v, axis, **options),
                 err_msg=str(options))


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=[0.5, 2.0, 0.0, 1.0], ignore_index=0),
    dict(label_smoothing=0.3, z_loss=0.05),
    dict(weight=[0.5, 2.0, 0.0, 1.0], ignore_index=3, label_smoothing=0.1, z_loss=0.01, reduction="none"),
]


def _problem(seed, shape=(5, 4), soft=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, shape)
    v = rng.normal(0, 1, shape)
    if soft:
        y = rng.random(shape)
        return x, y / y.sum(-1, keepdims=True), v
    return x, rng.integers(0, shape[-1], shape[:-1]), v


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_oracle(options, dtype):
    x, labels, v = _problem(30)
    x, v = cast(x, dtype), cast(v, dtype)
    out = sg.cross_entropy_hvp(x, labels, v, **options)
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    check(out, x.astype(np.float64), labels, v.astype(np.float64), dtype, **options)


@pytest.mark.parametrize("options", [o for o in OPTIONS if "ignore_index" not in o], ids=str)
def test_soft_labels(options):
    x, y, v = _problem(31, soft=True)
    check(sg.cross_entropy_hvp(x, y, v, **options), x, y, v, "float64", **options)


@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES),
       reduction=st.sampled_from(["mean", "sum", "none"]), z_loss=st.sampled_from([0.0, 0.01]))
def test_equals_the_jacobian_of_the_gradient(data, backend_dtype, reduction, z_loss):
    """The oracle's Hessian is the Jacobian of S p - q + 2 z lse p, built explicitly."""
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(max_dims=3, min_classes=1))
    x = data.draw(logits(dtype, shape, extreme=False))
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    labels = data.draw(hnp.arrays(np.int64, batch, elements=st.integers(0, shape[axis] - 1)))
    v = cast(data.draw(cotangents(shape)), dtype).astype(np.float64)
    out = sg.cross_entropy_hvp(on_backend(backend, x, dtype), labels, on_backend(backend, v, dtype), axis=axis,
                               reduction=reduction, z_loss=z_loss)
    assert out.dtype.name == dtype and tuple(out.shape) == shape
    check(out, x, labels, v, dtype, axis=axis, reduction=reduction, z_loss=z_loss)


@given(data=st.data(), z_loss=st.sampled_from([0.0, 0.01]))
def test_symmetric_and_positive_semidefinite(data, z_loss):
    """<u, H v> = <H u, v>; with z_loss = 0, H = S (diag p - p p^T) is PSD."""
    shape, axis = data.draw(shape_and_axis(max_dims=3, min_classes=1))
    x = data.draw(logits("float64", shape, extreme=False))
    y = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
    u, v = data.draw(cotangents(shape)), data.draw(cotangents(shape))
    hu = sg.cross_entropy_hvp(x, y, u, axis=axis, z_loss=z_loss)
    hv = sg.cross_entropy_hvp(x, y, v, axis=axis, z_loss=z_loss)
    terms = shape[axis] + int(np.prod(shape)) // shape[axis]
    tol_u = bound("float64", terms=terms, scale=hvp_scale(x, y, u, axis, z_loss=z_loss))
    tol_v = bound("float64", terms=terms, scale=hvp_scale(x, y, v, axis, z_loss=z_loss))
    assert_within(np.sum(u * hv), np.sum(hu * v), np.sum(np.abs(u) * tol_v) + np.sum(np.abs(v) * tol_u))
    if z_loss == 0:
        assert np.sum(v * hv) >= -np.sum(np.abs(v) * tol_v)


@pytest.mark.parametrize("dtype", TF_DTYPES)
def test_tensorflow_modes(tf_run, dtype):
    x, labels, v = _problem(32, shape=(3, 4, 5))
    options = dict(weight=[1.0, 0.5, 2.0, 1.0, 0.0], ignore_index=1, label_smoothing=0.1, z_loss=0.01)
    x, v = cast(x, dtype), cast(v, dtype)
    out = tf_run(lambda a, y, b: sg.cross_entropy_hvp(a, y, b, **options), x, labels.astype(np.int64), v)
    assert out.dtype.name == dtype
    check(out, x.astype(np.float64), labels, v.astype(np.float64), dtype, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensorflow_equals_autodiff_of_its_own_gradient(tf, tf_run, reduction):
    """Differentiating softgrad's gradient (its custom second derivative) gives the same H v.

    d<grad, v>/dx = H^T v = H v; for "none" each example's gradient depends on
    its own logits only, so the sum over examples gives each H_n v_n.
    """
    x, y, v = _problem(33, soft=True)
    options = dict(label_smoothing=0.1, z_loss=0.02, reduction=reduction)

    def via_autodiff(a, labels, b):
        with tf.GradientTape() as tape:
            tape.watch(a)
            _, grad = sg.cross_entropy_with_grad(a, labels, **options)
            directional = tf.reduce_sum(grad * b)
        return tape.gradient(directional, a), sg.cross_entropy_hvp(a, labels, b, **options)

    reverse_over_grad, hvp = tf_run(via_autodiff, x, y, v)
    check(reverse_over_grad, x, y, v, "float64", **options)
    check(hvp, x, y, v, "float64", **options)


def test_hvp_never_builds_the_hessian():
    """O(N C): the per-example Hessians would take N C^2 * 8 bytes = 1 GiB here."""
    n, c = 8, 4096
    x, labels, v = _problem(34, shape=(n, c))
    sg.cross_entropy_hvp(x, labels, v, z_loss=0.01)
    tracemalloc.start()
    try:
        sg.cross_entropy_hvp(x, labels, v, z_loss=0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * n * c * 8, f"peak {peak} bytes for inputs of {n * c * 8} bytes"
