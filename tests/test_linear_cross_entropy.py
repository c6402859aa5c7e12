"""linear_cross_entropy: held to cross_entropy(h @ W + b, t, ...) for every option and chunk size.

The oracle is the naive one-liner in float64 NumPy (tests/oracle.py on the
full logits); TensorFlow gradients are also checked against TF autodiff of
the plain path (tests/tf_reference.py). Tolerances come from
tests/tolerances.py with the reductions counted in ``terms``: D for the
matrix product, V for the log-sum-exp, N for the mean.
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import softgrad as sg
from strategies import cast
from tolerances import assert_close

LOW_PRECISION = ("float16", "bfloat16")


# -- the naive one-liner and its gradients, in float64 --------------------


def naive_logits(h, w, b, softcap):
    u = h @ w + (0.0 if b is None else b)
    return (u, u) if softcap is None else (softcap * np.tanh(u / softcap), u)


def naive(h, w, t, *, bias=None, softcap=None, chunk_size=None, **options):
    """(loss, dh, dw, db, |G|) of cross_entropy(h @ w + b, t) from the oracle.

    |G| bounds the terms of each entry of G = dloss/du, kappa (p (1 + 2 z
    |lse|) + q): its error is relative to them, not to their difference.
    """
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    b = None if bias is None else np.asarray(bias, np.float64)
    x, u = naive_logits(h, w, b, softcap)
    loss = oracle.cross_entropy(x, t, **options)
    # Gradients of "none" are those of the sum of the per-example losses.
    grad_options = {**options, "reduction": "sum"} if options.get("reduction") == "none" else options
    g = oracle.cross_entropy_grad(x, t, **grad_options)
    eps, z = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    valid = np.ones(t.shape, bool) if options.get("ignore_index") is None else t != options["ignore_index"]
    q = (1 - eps) * np.eye(w.shape[1])[np.where(valid, t, 0)] + eps / w.shape[1]
    kappa = valid / max(valid.sum(), 1) if grad_options.get("reduction", "mean") == "mean" else valid
    terms = (oracle.softmax(x) * (1 + 2 * z * np.abs(oracle.logsumexp(x)))[:, None] + q) * kappa[:, None]
    if softcap is not None:
        # d/du s tanh(u / s) = sech^2(u / s); 1 - tanh^2 would cancel.
        g, terms = g / np.cosh(u / softcap) ** 2, terms / np.cosh(u / softcap) ** 2
    return loss, g @ w.T, h.T @ g, None if b is None else g.sum(axis=0), terms


def check_all(actual, h, w, t, dtype, only=4, **kwargs):
    """actual = (loss, dh, dw, db) against the oracle, to the derived bound;
    the first ``only`` of them."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    b64 = None if kwargs.get("bias") is None else np.asarray(kwargs["bias"], np.float64)
    loss, dh, dw, db, g = naive(h64, w64, t, **kwargs)
    x, _ = naive_logits(h64, w64, b64, kwargs.get("softcap"))
    n, d = h64.shape
    terms = d + w64.shape[1] + n
    # The logits carry the matrix product's error, d u sum|h||w|, into every
    # exponent, like the shift's rounding does (tolerances.py, "spread").
    products = np.abs(h64) @ np.abs(w64)
    # Absent (-inf) logits have p = 0 and add no rounding: only finite ones count.
    xf = np.where(np.isfinite(x), x, np.nan)
    with np.errstate(invalid="ignore"):
        spread = float(np.nanmax(np.abs(xf - np.nanmax(xf, axis=-1, keepdims=True, initial=-np.inf)), initial=0.0))
    spread += d * float(np.max(products, initial=0.0))
    loss_scale = 1.0 + np.abs(loss) + kwargs.get("z_loss", 0.0) * np.nanmax(np.abs(xf), initial=0.0) ** 2
    names = ("loss", "dhidden", "dweight", "dbias")
    scales = (loss_scale, np.abs(g) @ np.abs(w64).T, np.abs(h64).T @ np.abs(g), np.abs(g).sum(axis=0))
    for name, a, e, scale in list(zip(names, actual, (loss, dh, dw, db), scales))[:only]:
        if e is None:
            assert a is None, name
            continue
        assert_close(a, e, dtype=dtype, terms=terms, spread=spread, scale=scale + np.abs(e), err_msg=name)


@st.composite
def problems(draw, dtypes=("float32", "float64")):
    """(h, w, t, options) with small shapes and every option drawn."""
    dtype = draw(st.sampled_from(dtypes))
    n, d, v = draw(st.integers(0, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h = cast(rng.normal(size=(n, d)), dtype)
    w = cast(rng.normal(size=(d, v)), dtype)
    t = rng.integers(0, v, size=n)
    options = {
        "chunk_size": draw(st.one_of(st.just(1), st.integers(1, v + 3))),
        "softcap": draw(st.sampled_from([None, 1.5])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "z_loss": draw(st.sampled_from([0.0, 0.01])),
    }
    if draw(st.booleans()):
        options["bias"] = cast(rng.normal(size=v), dtype)
    ignore = draw(st.sampled_from([None, -100, 0]))
    if ignore is not None:
        options["ignore_index"] = ignore
        t = np.where(rng.random(n) < 0.3, ignore, t)
    return h, w, t, dtype, options


@given(problems())
def test_numpy_equals_the_naive_computation(problem):
    h, w, t, dtype, options = problem
    loss = sg.linear_cross_entropy(h, w, t, **options)
    result = sg.linear_cross_entropy_with_grad(h, w, t, **options)
    assert all(a is None or a.dtype == np.dtype(dtype) for a in result)
    np.testing.assert_array_equal(loss, result[0])
    check_all(result, h, w, t, dtype, **options)



# -- the NumPy driver's two paths: compiled chunk kernels and plain NumPy ----


@pytest.fixture(params=["kernels", "pure"])
def numpy_path(request, monkeypatch):
    """Runs a test once on the compiled chunk kernels and once on ``_linear_maths``."""
    import importlib

    from softgrad import kernels

    # softgrad.linear_cross_entropy is the function; the module holds the driver.
    module = importlib.import_module("softgrad.linear_cross_entropy")
    if request.param == "kernels":
        if not kernels.enabled():
            pytest.skip(kernels.status()["reason"])
    else:
        monkeypatch.setattr(module, "_fused", lambda call: False)
    return request.param


@st.composite
def wide_problems(draw):
    """Rows longer than the kernels' summation blocks (256), chunks that split them unevenly."""
    h, w, t, dtype, options = draw(problems())
    v = draw(st.integers(257, 700))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, d = h.shape
    w = cast(rng.normal(size=(d, v)) * draw(st.sampled_from([1.0, 4.0])), dtype)
    t = np.where(t == options.get("ignore_index", -1), t, rng.integers(0, v, size=n))
    if "bias" in options:
        options["bias"] = cast(rng.normal(size=v), dtype)
    options["chunk_size"] = draw(st.sampled_from([1, 100, 300, v, v + 5]))
    return h, w, t, dtype, options


# The fixture only picks the path, which holds for every generated input.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=wide_problems())
def test_both_numpy_paths_equal_the_naive_computation(numpy_path, problem):
    h, w, t, dtype, options = problem
    result = sg.linear_cross_entropy_with_grad(h, w, t, **options)
    assert all(a is None or a.dtype == np.dtype(dtype) for a in result)
    np.testing.assert_array_equal(sg.linear_cross_entropy(h, w, t, **options), result[0])
    check_all(result, h, w, t, dtype, **options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "label_smoothing": 0.1, "z_loss": 0.01}])
def test_both_numpy_paths_keep_absent_and_poisoned_rows(numpy_path, dtype, options):
    """A bias of -inf makes class 1 absent (p = 0, gradient 0; soft-capped it
    is -s instead); a NaN poisons its own row only; a label on the absent
    class costs +inf with a finite gradient. Chunks of 4 of the 9 classes.

    That last row's gradient is not compared with the oracle, whose gradient
    of an infinite loss is 0 in every entry: the chunked path gives p at the
    other classes, on both paths alike."""
    rng = np.random.default_rng(13)
    n, d, v = 5, 3, 9
    h = cast(rng.normal(size=(n, d)), dtype)
    w = cast(rng.normal(size=(d, v)), dtype)
    b = cast(rng.normal(size=v), dtype)
    b[1] = -np.inf
    h[2, 0] = np.nan
    t = np.array([2, 3, 4, 5, 1])
    options = {**options, "bias": b, "chunk_size": 4, "reduction": "none"}
    loss, dh, dw, db = sg.linear_cross_entropy_with_grad(h, w, t, **options)
    assert np.isnan(loss[2]) and np.isnan(dh[2]).all()
    assert np.isnan(dw).all() and np.isnan(db).all()  # every class sees the NaN row
    kept = [0, 1, 3]
    check_all((loss[kept], dh[kept], None, None), h[kept], w, t[kept], dtype, **options, only=2)
    assert (loss[4] == np.inf) == ("softcap" not in options) and np.isfinite(dh[4]).all()


def test_default_chunk_size_with_the_kernels():
    """One N x B block is held with the kernels, so the budget buys wider chunks."""
    from softgrad.linear_cross_entropy import default_chunk_size

    assert default_chunk_size(4096, 32768, 4, "numba") == 2048
    assert default_chunk_size(1024, 16384, 4, "numba") == 8192
    assert default_chunk_size(4096, 1000, 8, "numba") == 1000
    assert default_chunk_size(4096, 32768, 4, "numba-softcap") == 1024

def test_chunk_sizes_agree_with_each_other():
    """1, a non-divisor of V, a divisor, V and more than V give the same numbers."""
    rng = np.random.default_rng(1)
    h, w, b = rng.normal(size=(9, 5)), rng.normal(size=(5, 20)), rng.normal(size=20)
    t = rng.integers(0, 20, size=9)
    results = [sg.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=c) for c in (1, 3, 7, 10, 20, 50)]
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-15)


def test_batch_dims_and_reduction_none_keep_the_shape():
    rng = np.random.default_rng(2)
    h, w = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 6))
    t = rng.integers(0, 6, size=(2, 3))
    loss, dh, dw, _ = sg.linear_cross_entropy_with_grad(h, w, t, reduction="none", chunk_size=4)
    assert loss.shape == (2, 3) and dh.shape == (2, 3, 4) and dw.shape == (4, 6)
    expected = oracle.cross_entropy(h @ w, t, reduction="none")
    np.testing.assert_allclose(loss, expected, rtol=1e-13)


def test_confident_row_keeps_full_relative_precision():
    """Logits [0, -40]: the loss is log1p(e^-40), not 0, and the gradient at
    the label is -p_1 exactly, even with the label alone in its chunk."""
    h = np.array([[1.0]])
    w = np.array([[0.0, -40.0]])
    loss, dh, dw, _ = sg.linear_cross_entropy_with_grad(h, w, np.array([0]), chunk_size=1)
    p1 = np.exp(-40.0) / (1 + np.exp(-40.0))
    np.testing.assert_allclose(loss, np.log1p(np.exp(-40.0)), rtol=1e-15)
    np.testing.assert_allclose(dw, [[-p1, p1]], rtol=1e-15)


def test_nan_poisons_only_its_row():
    rng = np.random.default_rng(3)
    h, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 7))
    h[1, 2] = np.nan
    loss = sg.linear_cross_entropy(h, w, np.array([1, 2, 3]), reduction="none", chunk_size=3)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))


def test_all_ignored_mean_is_zero_with_zero_gradient():
    rng = np.random.default_rng(4)
    h, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    loss, dh, dw, _ = sg.linear_cross_entropy_with_grad(h, w, np.full(3, -1), ignore_index=-1)
    assert loss == 0 and not dh.any() and not dw.any()


def test_default_chunk_size_follows_the_memory_budget():
    assert sg.linear_cross_entropy.__module__ == "softgrad.linear_cross_entropy"
    from softgrad.linear_cross_entropy import default_chunk_size

    assert default_chunk_size(4096, 32768, 4, "tensorflow") == 256
    assert default_chunk_size(2048, 131072, 4, "tensorflow") == 512
    assert default_chunk_size(4096, 32768, 4, "numpy") == 128
    assert default_chunk_size(4096, 100, 4, "tensorflow") == 100
    assert default_chunk_size(10**6, 32768, 8, "numpy") == 128


# -- memory ------------------------------------------------------------------


def test_numpy_never_allocates_the_logits():
    """Peak traced memory stays far below one N x V float32 buffer (128 MiB)."""
    n, d, v = 2048, 16, 16384
    rng = np.random.default_rng(5)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    t = rng.integers(0, v, size=n)
    logits_bytes = n * v * 4
    tracemalloc.start()
    try:
        sg.linear_cross_entropy_with_grad(h, w, t, chunk_size=256, label_smoothing=0.1, softcap=30.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # dW (d * v * 4 = 1 MiB) plus a few n x 256 blocks (2 MiB each).
    assert peak < logits_bytes / 8, f"peak {peak / 2**20:.1f} MiB"


def test_tensorflow_never_allocates_the_logits(tf):
    n, d, v = 2048, 16, 16384
    rng = np.random.default_rng(6)
    h = tf.constant(rng.normal(size=(n, d)).astype(np.float32))
    w = tf.constant(rng.normal(size=(d, v)).astype(np.float32))
    t = tf.constant(rng.integers(0, v, size=n))

    def step():
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = sg.linear_cross_entropy(h, w, t, chunk_size=256)
        return tape.gradient(loss, [h, w])

    step()  # compile first: XLA's compiler is not what is measured
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    grads = step()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    assert grads[1].shape == (d, v)
    assert peak < n * v * 4 / 8, f"peak {peak / 2**20:.1f} MiB"



def test_tensorflow_holds_dw_once(tf):
    """Peak = dW + dh + one chunk's temporaries: no second copy of dW.

    The gradient pass holds dW and dh and, per chunk, the N x B gradient
    block (written over the logits), the N x D product G_k W_k^T before it
    is added into dh, and two D x B blocks; the log-sum-exp pass holds two
    N x B blocks and no gradient (see the default chunk width in
    linear_cross_entropy.py). The slack, a quarter of dW, covers the per-row
    vectors and the allocator's rounding; a copy of dW would exceed it.
    """
    n, d, v, width = 1024, 64, 16384, 256
    rng = np.random.default_rng(7)
    h = tf.constant(rng.normal(size=(n, d)).astype(np.float32))
    w = tf.constant((rng.normal(size=(d, v)) / 8).astype(np.float32))
    t = tf.constant(rng.integers(0, v, size=n))

    def step():
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = sg.linear_cross_entropy(h, w, t, chunk_size=width)
        return tape.gradient(loss, [h, w])

    step()  # compile first
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    grads = step()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    dw, dh = d * v * 4, n * d * 4
    chunk = (n * width + n * d + 2 * d * width) * 4
    bound = max(2 * n * width * 4, dw + dh + chunk) + dw // 4
    assert grads[1].shape == (d, v)
    assert peak <= bound, f"peak {peak / 2**20:.2f} MiB > {bound / 2**20:.2f} MiB"

# -- TensorFlow ------------------------------------------------------------

TF_OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 0.01, "softcap": 1.5},
    {"ignore_index": -100, "reduction": "sum"},
    {"ignore_index": 2, "reduction": "none", "label_smoothing": 0.2},
]


def _tf_problem(dtype, with_bias=True, n=5, d=3, v=11, seed=7):
    rng = np.random.default_rng(seed)
    h = cast(rng.normal(size=(n, d)), dtype)
    w = cast(rng.normal(size=(d, v)), dtype)
    b = cast(rng.normal(size=v), dtype) if with_bias else None
    t = rng.integers(0, v, size=n)
    t[1] = -100
    t[3] = 2
    return h, w, b, t


def _valid_labels(t, options):
    ignore = options.get("ignore_index")
    return np.where(t == -100, 0, t) if ignore != -100 else t


def _tf_loss_and_grads(tf, options):
    def f(h, w, t, *bias):
        with tf.GradientTape() as tape:
            tape.watch([h, w, *bias])
            loss = sg.linear_cross_entropy(h, w, t, bias=bias[0] if bias else None, **options)
        return (loss,) + tuple(tape.gradient(loss, [h, w, *bias]))

    return f


@pytest.mark.parametrize("options", TF_OPTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 11, 16])
def test_tensorflow_equals_the_naive_computation(tf, tf_run, options, chunk_size):
    h, w, b, t = _tf_problem("float64")
    t = _valid_labels(t, options)
    options = {**options, "chunk_size": chunk_size}
    f = _tf_loss_and_grads(tf, options)
    actual = tf_run(f, h, w, t, b)
    check_all(actual, h, w, t, "float64", bias=b, **options)


@pytest.mark.parametrize("options", TF_OPTIONS)
def test_tensorflow_gradients_equal_autodiff_of_the_plain_path(tf, options):
    import tf_reference

    h, w, b, t = _tf_problem("float64", seed=8)
    t = _valid_labels(t, options)
    softcap = options.get("softcap")
    plain_options = {k: v for k, v in options.items() if k != "softcap"}
    hv, wv, bv = (tf.Variable(a) for a in (h, w, b))

    def plain():
        x = hv @ wv + bv
        x = x if softcap is None else softcap * tf.tanh(x / softcap)
        return tf.reduce_sum(tf_reference.cross_entropy(x, t, **plain_options))

    def ours():
        return tf.reduce_sum(sg.linear_cross_entropy(hv, wv, tf.constant(t), bias=bv, chunk_size=3, **options))

    grads = []
    for loss_fn in (plain, ours):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads.append([loss.numpy()] + [g.numpy() for g in tape.gradient(loss, [hv, wv, bv])])
    for a, e in zip(grads[1], grads[0]):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


def test_tensorflow_with_grad_equals_the_tape(tf):
    h, w, b, t = _tf_problem("float32", seed=9)
    t = _valid_labels(t, {})
    loss, dh, dw, db = sg.linear_cross_entropy_with_grad(tf.constant(h), tf.constant(w), tf.constant(t),
                                                          bias=tf.constant(b), chunk_size=4, softcap=2.0)
    check_all((loss, dh, dw, db), h, w, t, "float32", bias=b, chunk_size=4, softcap=2.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_half_precision_accumulates_in_float32(tf, dtype):
    """Over 64 chunks every output stays within the bound of float32
    arithmetic followed by one rounding to the low dtype."""
    h, w, b, t = _tf_problem(dtype, n=16, d=8, v=1024, seed=10)
    t = _valid_labels(t, {})
    tensors = [tf.constant(a) for a in (h, w, b)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = sg.linear_cross_entropy(tensors[0], tensors[1], tf.constant(t), bias=tensors[2], chunk_size=16)
    grads = tape.gradient(loss, tensors)
    assert loss.dtype.name == dtype and all(g.dtype.name == dtype for g in grads)
    check_all([loss, *grads], h, w, t, dtype, bias=b, chunk_size=16)


def test_tensorflow_unknown_batch_size_in_a_graph(tf):
    h, w, b, t = _tf_problem("float32", seed=11)
    t = _valid_labels(t, {})
    f = tf.function(
        lambda h, t: sg.linear_cross_entropy(h, tf.constant(w), t, reduction="none"),
        input_signature=[tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None], tf.int64)],
    )
    np.testing.assert_allclose(f(h, t).numpy(), oracle.cross_entropy(h.astype(np.float64) @ w, t, reduction="none"),
                               rtol=1e-5)


# -- bad input -------------------------------------------------------------


def _args():
    rng = np.random.default_rng(12)
    return rng.normal(size=(4, 3)), rng.normal(size=(3, 6)), np.array([0, 1, 5, 2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, t: (h, w[:2], t), r"hidden.shape\[-1\] = D = 3, got 2"),
        (lambda h, w, t: (h, w[0], t), r"weight must have shape \(D, V\).*rank 1"),
        (lambda h, w, t: (h, w[None], t), r"weight must have shape \(D, V\).*rank 3"),
        (lambda h, w, t: (h, w, np.array([0, 1, 6, 2])), r"labels must be in \[0, 6\); got 6 at position \(2,\)"),
        (lambda h, w, t: (h, w, np.array([0, -1, 1, 2])), r"got -1"),
        (lambda h, w, t: (h, w, t[:3]), r"integer labels must have shape \(4,\)"),
        (lambda h, w, t: (h, w, t.astype(float)), r"integer class indices, got labels of dtype float64"),
        (lambda h, w, t: (h, w.astype(np.float32), t), r"weight must have hidden's dtype float64, got float32"),
        (lambda h, w, t: (h.astype(int), w, t), r"hidden must be a floating-point array"),
    ],
)
def test_bad_input_is_named(change, message):
    with pytest.raises(sg.SoftgradError, match=message):
        sg.linear_cross_entropy(*change(*_args()))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bias": np.zeros(5)}, r"bias must have shape \(6,\)"),
        ({"chunk_size": 0}, r"chunk_size must be None or an int >= 1, got 0"),
        ({"softcap": -1.0}, r"softcap must be None or a Python float > 0, got -1.0"),
        ({"reduction": "avg"}, r"reduction must be one of"),
        ({"label_smoothing": 2.0}, r"label_smoothing must be in \[0, 1.0\], got 2.0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(sg.SoftgradError, match=message):
        sg.linear_cross_entropy(*_args(), **options)


def test_tensorflow_labels_out_of_range_are_named(tf):
    h, w, _ = _args()
    with pytest.raises(sg.SoftgradError, match=r"labels must be in \[0, 6\); got 7"):
        sg.linear_cross_entropy(tf.constant(h), tf.constant(w), tf.constant([0, 7, 1, 2]))
