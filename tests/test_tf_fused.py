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
