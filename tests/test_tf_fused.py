"""The XLA-compiled whole operations agree with the op-by-op TensorFlow path.

Large inputs take the compiled path; here the size threshold is moved so that
small inputs take each path in turn, and values, gradients and second
derivatives (a tape of a tape) are compared.
"""

import numpy as np
import pytest

import softgrad as sg
from tolerances import assert_close

tf = pytest.importorskip("tensorflow")
fused = pytest.importorskip("softgrad.backends.tensorflow_fused")

N, C = 6, 9


def _inputs():
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(N, C)) * 3)
    x = tf.tensor_scatter_nd_update(x, [[0, 0], [1, 2]], [40.0, -np.inf])
    labels = tf.constant(rng.integers(0, C, N))
    ignored = tf.where(labels % 3 == 0, tf.constant(-1, labels.dtype), labels)
    weight = tf.constant(rng.uniform(0.5, 2.0, C))
    v = tf.constant(rng.normal(size=(N, C)))
    return x, labels, ignored, weight, v


X, LABELS, IGNORED, WEIGHT, V = _inputs()
SPREAD = float(np.max(np.abs(np.where(np.isfinite(X), X - np.max(X, axis=-1, keepdims=True), 0.0)))) / 0.5

OPS = {
    "softmax": lambda x: sg.softmax(x),
    "log_softmax": lambda x: sg.log_softmax(x),
    "softmax_temperature": lambda x: sg.softmax(x, temperature=0.5),
    "log_softmax_temperature": lambda x: sg.log_softmax(x, temperature=3.0),
    "cross_entropy": lambda x: sg.cross_entropy(x, LABELS),
    "cross_entropy_options": lambda x: sg.cross_entropy(
        x, LABELS, weight=WEIGHT, label_smoothing=0.1, z_loss=1e-3
    ),
    "cross_entropy_ignored_sum": lambda x: sg.cross_entropy(x, IGNORED, ignore_index=-1, reduction="sum"),
    "cross_entropy_none": lambda x: sg.cross_entropy(x, LABELS, reduction="none"),
    "with_grad_loss": lambda x: sg.cross_entropy_with_grad(x, LABELS, label_smoothing=0.2)[0],
    "with_grad_grad": lambda x: sg.cross_entropy_with_grad(x, IGNORED, ignore_index=-1, z_loss=1e-2)[1],
}


def _value_gradient_and_second(op):
    x = X
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            out = op(x)
            scalar = tf.reduce_sum(out * V) if out.shape.rank == 2 else tf.reduce_sum(out)
        grad = inner.gradient(scalar, x)
        projected = tf.reduce_sum(grad * V)
    return out, grad, outer.gradient(projected, x)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("compiled_caller", [False, True], ids=["eager", "tf.function"])
def test_compiled_path_matches_op_by_op(name, compiled_caller, monkeypatch):
    op = OPS[name]
    run = tf.function(_value_gradient_and_second) if compiled_caller else _value_gradient_and_second
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1 << 62)
    expected = run(op)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    actual = run(op)
    for what, a, e in zip(("value", "gradient", "second derivative"), actual, expected):
        e = e.numpy()
        # Two float64 evaluations of the same formulas: each is within the
        # table's bound of the truth, so they are within twice of each other.
        scale = 2 * np.max(np.abs(np.where(np.isfinite(e), e, 0.0)))
        assert_close(a.numpy(), e, dtype="float64", terms=C, spread=SPREAD, scale=scale, err_msg=f"{name} {what}")


def test_compiled_path_is_taken_for_large_inputs(monkeypatch):
    calls = []
    original = fused.softmax_family
    monkeypatch.setattr(fused, "softmax_family", lambda *a, **k: calls.append(a) or original(*a, **k))
    sg.softmax(tf.zeros((2, fused.MIN_ELEMENTS // 2)))
    sg.softmax(tf.zeros((2, 3)))
    assert len(calls) == 1


# -- cross-entropy from the labels: edge rows through the compiled path ------

BIG32 = float(np.finfo(np.float32).max)
EDGE_ROWS = np.array([
    [0.0, -40.0, -45.0, -50.0, -60.0],  # confident, label at the max
    [0.0, -40.0, -45.0, -50.0, -60.0],  # confident, label elsewhere
    [3.0, 3.0, 1.0, 3.0, -2.0],  # ties at the max, label among them
    [3.0, 3.0, 1.0, 3.0, -2.0],  # ties at the max, label below
    [1.0, -np.inf, 0.0, 2.0, 0.5],  # label on an absent class
    [1.0, np.nan, 0.0, 2.0, 0.0],  # NaN
    [1.0, np.inf, 0.0, 2.0, 0.0],  # +inf
    [BIG32, -BIG32, 0.0, 1.0, 2.0],  # a shifted logit that overflows: saturates
    [-np.inf] * 5,  # no entry left
    [0.5, 1.0, -1.0, 2.0, 0.0],  # an ordinary row
])
EDGE_LABELS = np.array([0, 1, 1, 2, 1, 0, 3, 1, 2, 4])
EDGE_OPTIONS = {
    "plain": {},
    "ignored": {"ignore_index": 4},
    "weight_smoothing": {"weight": np.array([0.5, 2.0, 1.0, 0.0, 1.5]), "label_smoothing": 0.1},
}
# No z_loss here: it squares the log-sum-exp, which for the saturating row is
# a true overflow; test_compiled_path_matches_op_by_op covers it.


def _edge_outputs(x, labels, options):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = sg.cross_entropy(x, labels, reduction="none", **options)
        mean = sg.cross_entropy(x, labels, **options)
        with_grad_loss, with_grad = sg.cross_entropy_with_grad(x, labels, reduction="none", **options)
    return dict(loss=loss, grad=tape.gradient(loss, x), mean_grad=tape.gradient(mean, x),
                with_grad_loss=with_grad_loss, with_grad=with_grad)


@pytest.mark.parametrize("option_name", sorted(EDGE_OPTIONS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_edge_rows_match_op_by_op(tf_run, option_name, dtype, monkeypatch):
    """-inf absent, NaN/+inf poison their row, saturation, ties and empty rows
    come out of the compiled label path as out of the op-by-op path."""
    options = {k: tf.constant(v, dtype) if k == "weight" else v for k, v in EDGE_OPTIONS[option_name].items()}
    run = lambda: tf_run(lambda x: _edge_outputs(x, EDGE_LABELS, options), EDGE_ROWS.astype(dtype))
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1 << 62)
    expected = run()
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    actual = run()
    for name, e in expected.items():
        a, e = actual[name].astype(np.float64), e.astype(np.float64)
        # the same non-finite entries, row by row
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{name} NaN")
        np.testing.assert_array_equal(np.where(np.isinf(e), e, 0), np.where(np.isinf(a), a, 0), err_msg=name)
        finite = np.isfinite(e)
        # two evaluations, each within the bound of the truth: twice the
        # bound, relative to each row's largest entry
        scale = 2 * np.max(np.abs(np.where(finite, e, 0.0)), axis=-1, keepdims=True) if e.ndim > 1 else 2 * e
        assert_close(np.where(finite, a, 0.0), np.where(finite, e, 0.0), dtype=dtype, terms=5 + len(EDGE_LABELS),
                     spread=80, scale=scale * np.ones_like(e), err_msg=f"{option_name} {name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_label_path_keeps_full_relative_precision(tf_run, dtype, monkeypatch):
    """Per row, loss and gradient to full relative precision, tiny components
    included, whether or not the label is at the max (mpmath reference)."""
    import mpmath

    rows = EDGE_ROWS[[0, 1, 2, 3, 9]]
    labels = EDGE_LABELS[[0, 1, 2, 3, 9]]
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    out = tf_run(lambda x: _edge_outputs(x, labels, {}), rows.astype(dtype))
    with mpmath.workdps(60):
        for i, (row, label) in enumerate(zip(rows, labels)):
            e = [mpmath.exp(mpmath.mpf(float(v))) for v in row]
            p = [v / mpmath.fsum(e) for v in e]
            loss = float(-mpmath.log(p[label]))
            grad = np.array([float(pc - (1 if c == label else 0)) for c, pc in enumerate(p)])
            for name in ("loss", "with_grad_loss"):
                assert_close(out[name][i], loss, dtype=dtype, terms=5, spread=60, scale=abs(loss),
                             err_msg=f"row {i} {name}")
            for name in ("grad", "with_grad"):
                assert_close(out[name][i], grad, dtype=dtype, terms=5, spread=60, scale=np.abs(grad),
                             err_msg=f"row {i} {name}")


# -- the softmax family with the blocked argmax --------------------------------

WIDE = 256  # has a divisor from 16 to sqrt(C): the argmax goes by blocks


def _wide_rows(dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, WIDE)) * 3
    x[0, [5, 77, 200]] = 20.0  # ties at the max in different columns and blocks
    x[1, ::3] = -np.inf  # absent entries
    x[2, 10] = np.nan
    x[3, 100] = np.inf
    x[4] = -np.inf  # no entry left
    x[5, :] = -40.0
    x[5, 255] = 0.0  # confident, max in the last entry
    big = float(np.finfo(dtype).max)
    x[6, 0], x[6, 1] = big, -big  # a shifted logit that overflows: saturates
    return x.astype(dtype)


def test_blocked_argmax_finds_a_max():
    x = _wide_rows("float64")
    found = fused._argmax_index(tf.constant(x)).numpy()[..., 0]
    ordinary = [0, 1, 4, 5, 6, 7]
    row_max = np.max(x[ordinary], axis=-1)
    np.testing.assert_array_equal(x[ordinary, found[ordinary]], row_max)
    assert np.all((found >= 0) & (found < WIDE))
    assert fused._block_size(WIDE) == 16 and fused._block_size(17) is None and fused._block_size(None) is None
    relaxed = tf.function(fused._argmax_index, input_signature=[tf.TensorSpec([None, None], tf.float64)])
    plain = relaxed(tf.constant(x[ordinary])).numpy()[..., 0]
    np.testing.assert_array_equal(x[ordinary, plain], row_max)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sum_except_leaves_the_entry_out(tf_run, dtype):
    """The blocked sum without one entry per row has the precision of a sum
    of the others: a huge entry left out does not swamp them. The entries
    sit first, last, and in the first or last row or column of the layout."""
    cols = WIDE // fused._block_size(WIDE)
    index = np.array([0, WIDE - 1, cols - 1, WIDE - cols, 5 * cols + 7, 3])[:, None]
    rng = np.random.default_rng(6)
    a = rng.uniform(1.0, 2.0, size=(len(index), WIDE)) * 1e-6
    np.put_along_axis(a, index, 1e30, axis=-1)
    a[-1, 9] = np.nan  # a NaN elsewhere spoils its row's sum
    a = a.astype(dtype)
    out = tf_run(fused.sum_except, a, index.astype(np.int32))
    expected = np.sum(np.where(np.arange(WIDE) == index, 0.0, a.astype(np.float64)), axis=-1, keepdims=True)
    assert np.isnan(out[-1, 0])
    # a sum of WIDE - 1 positive terms: relative precision
    assert_close(out[:-1], expected[:-1], dtype=dtype, terms=WIDE, spread=0, scale=expected[:-1])
    plain = tf_run(fused.sum_except, a[:, :17], np.minimum(index, 16).astype(np.int32))  # no block layout
    expected = np.sum(np.where(np.arange(17) == np.minimum(index, 16), 0.0, a[:, :17].astype(np.float64)), -1)
    assert_close(plain[:-1, 0], expected[:-1], dtype=dtype, terms=17, spread=0, scale=expected[:-1])


def _value_gradient_second(op):
    """(op(x), its VJP with v, the derivative of <VJP, v>) for one softmax-family op."""

    def value_gradient_second(x, v):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                out = op(x)
            grad = inner.gradient(out, x, output_gradients=v)
            projected = tf.reduce_sum(tf.where(tf.math.is_finite(grad), grad, 0) * v)
        return out, grad, outer.gradient(projected, x)

    return value_gradient_second


@pytest.mark.parametrize("name", ["softmax", "softmax_temperature", "log_softmax", "log_softmax_temperature"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_family_edge_rows_match_op_by_op(tf_run, name, dtype, monkeypatch):
    """Ties across blocks, absent entries, NaN/+inf, empty, confident and
    saturating rows: values, gradients and second derivatives of the
    compiled path (blocked argmax, anchored log-sum-exp) against op by op."""
    x = _wide_rows(dtype)
    v = np.random.default_rng(4).normal(size=x.shape).astype(dtype)
    value_gradient_second = _value_gradient_second(OPS[name])

    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1 << 62)
    expected = tf_run(value_gradient_second, x, v)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    actual = tf_run(value_gradient_second, x, v)
    temperature = {"softmax_temperature": 0.5, "log_softmax_temperature": 3.0}.get(name, 1.0)
    z = 40.0 / 0.5 / temperature  # as SPREAD: twice the rows' largest shifted logit
    for what, a, e in zip(("value", "gradient", "second derivative"), actual, expected):
        a, e = a.astype(np.float64), e.astype(np.float64)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{name} {what} NaN")
        finite = np.isfinite(e)
        np.testing.assert_array_equal(np.where(finite, 0, e), np.where(finite, 0, a), err_msg=f"{name} {what}")
        # twice each row's bound; the saturating row's is capped where it
        # would overflow
        with np.errstate(over="ignore"):
            scale = np.minimum(2 * np.max(np.abs(np.where(finite, e, 0.0)), axis=-1, keepdims=True),
                               np.finfo(np.float64).max) * np.ones_like(e)
        assert_close(np.where(finite, a, 0.0), np.where(finite, e, 0.0), dtype=dtype, terms=WIDE,
                     spread=z, scale=scale, err_msg=f"{name} {what}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_by_tensorflows_kernel_on_finite_logits(tf_run, dtype, monkeypatch):
    """Finite logits (T = 1) go through TensorFlow's own softmax kernel op
    by op and through the maths under XLA; both agree with op by op, ties,
    confident and saturating rows included, gradient and second derivative
    too. A NaN, a +inf or a row with no entry, each alone, sends the input
    to the maths instead (op by op: the NaN it leaves in the kernel's
    output)."""
    x = _wide_rows(dtype)[[0, 5, 6, 7]]
    v = np.random.default_rng(5).normal(size=x.shape).astype(dtype)
    value_gradient_second = _value_gradient_second(OPS["softmax"])

    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1 << 62)
    expected = tf_run(value_gradient_second, x, v)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1)
    kernel_calls = []
    original = tf.nn.softmax
    monkeypatch.setattr(tf.nn, "softmax", lambda *a, **k: kernel_calls.append(1) or original(*a, **k))
    actual = tf_run(value_gradient_second, x, v)
    assert bool(kernel_calls) == (tf_run.mode != "xla")
    for what, a, e in zip(("value", "gradient", "second derivative"), actual, expected):
        scale = 2 * np.max(np.abs(e), axis=-1, keepdims=True) * np.ones_like(e)
        assert_close(a, e, dtype=dtype, terms=WIDE, spread=80, scale=scale, err_msg=what)
    # one non-finite logit anywhere: the maths' result for every row
    poisoned = x.copy()
    poisoned[1, 3] = np.nan
    out = tf_run(lambda x: sg.softmax(x), poisoned)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2, 3]]))
    infinite = x.copy()
    infinite[3, 7] = np.inf
    out = tf_run(lambda x: sg.softmax(x), infinite)
    assert np.all(np.isnan(out[3])) and np.all(np.isfinite(out[:3]))
    empty = x.copy()
    empty[2] = -np.inf
    out = tf_run(lambda x: sg.softmax(x), empty)
    np.testing.assert_array_equal(out[2], 0.0)
    assert np.all(np.isfinite(out))
