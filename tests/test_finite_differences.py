"""Central finite differences in float64, first and second order, against every
derivative softgrad computes (closed forms and TensorFlow tapes).

Inputs follow the assumptions of the finite-difference entries in
tolerances.py: |x| <= 4, T >= 1, directions of max-norm 1, <= 8 classes,
target weights summing to <= 2 per example.
"""

import numpy as np
import pytest

import softgrad as sg
from tolerances import FD_ATOL, FD_STEP, FD2_ATOL, FD2_STEP, assert_within


def central(f, x, d, h=FD_STEP):
    return (np.asarray(f(x + h * d)) - np.asarray(f(x - h * d))) / (2 * h)


def second(f, x, d, h=FD2_STEP):
    return (np.asarray(f(x + h * d)) - 2 * np.asarray(f(x)) + np.asarray(f(x - h * d))) / h**2


def fd_close(actual, expected, values, atol=FD_ATOL, examples=1):
    """Within the finite-difference bound, relative to max(1, |f|) (times the
    number of examples a "sum" adds up, whose derivatives add up too)."""
    scale = examples * max(1.0, float(np.max(np.abs(values), initial=0)))
    assert_within(actual, np.asarray(expected, dtype=np.float64), atol * scale)


def problem(seed, shape=(3, 6)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4, 4, shape)
    d = rng.uniform(-1, 1, shape)
    w = rng.uniform(-1, 1, shape)
    mask = rng.random(shape) < 0.8
    mask[..., 0] = True
    return x, d, w, mask


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("temperature", [1.0, 1.75])
@pytest.mark.parametrize("axis", [-1, 0])
def test_jacobian_jvp_vjp(name, temperature, axis):
    x, d, w, mask = problem(60, shape=(3, 6) if axis == -1 else (6, 3))
    forward = getattr(sg, name)
    f = lambda a: np.where(mask, forward(a, axis=axis, temperature=temperature, where=mask), 0.0)
    fd = central(f, x, d)
    jac = getattr(sg, f"{name}_jacobian")(x, axis=axis, temperature=temperature, where=mask)
    dx = np.moveaxis(d, axis, -1)
    fd_close(np.moveaxis(np.einsum("...ij,...j->...i", jac, dx), -1, axis), fd, f(x))
    y = forward(x, axis=axis, temperature=temperature, where=mask)
    # the products are derivatives with respect to z = x / T
    jvp = getattr(sg, f"{name}_jvp")(y, np.where(mask, d, 0.0) / temperature, axis=axis)
    fd_close(np.where(mask, jvp, 0.0), fd, f(x))
    vjp = getattr(sg, f"{name}_vjp")(y, np.where(mask, w, 0.0), axis=axis)
    fd_close(np.sum(vjp * np.where(mask, d, 0.0)) / temperature, np.sum(w * fd), f(x), examples=x.size)


OPTIONS = [
    dict(),
    dict(weight=[0.5, 2.0, 1.0, 0.0, 1.5, 1.0], ignore_index=1, label_smoothing=0.1, z_loss=0.01),
    dict(label_smoothing=0.2, reduction="sum", z_loss=0.02),
    dict(weight=[0.5, 2.0, 1.0, 0.0, 1.5, 1.0], reduction="none"),
]


def _labels(seed, soft, shape=(3, 6)):
    rng = np.random.default_rng(seed)
    if soft:
        y = rng.random(shape)
        return y / y.sum(-1, keepdims=True)
    return rng.integers(0, shape[-1], shape[:-1])


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_cross_entropy_gradient_and_hvp(options, soft):
    if soft:
        options = {k: v for k, v in options.items() if k not in ("ignore_index", "weight")}
    x, d, w, _ = problem(61)
    labels = _labels(62, soft)
    examples = 3 if options.get("reduction") == "sum" else 1
    loss_fn = lambda a: sg.cross_entropy(a, labels, **options)
    _, grad = sg.cross_entropy_with_grad(x, labels, **options)
    fd = central(loss_fn, x, d)
    if options.get("reduction") == "none":
        fd_close(np.sum(grad * d, axis=-1), fd, loss_fn(x))
    else:
        fd_close(np.sum(grad * d), fd, loss_fn(x), examples=examples)
    grad_fn = lambda a: sg.cross_entropy_with_grad(a, labels, **options)[1]
    fd_close(sg.cross_entropy_hvp(x, labels, d, **options), central(grad_fn, x, d), grad, examples=examples)


@pytest.mark.parametrize("options", OPTIONS[:3], ids=str)
def test_cross_entropy_second_difference(options):
    """(f(x + h d) - 2 f(x) + f(x - h d)) / h^2 = d^T H d, straight from the loss."""
    x, d, _, _ = problem(63)
    labels = _labels(64, False)
    loss_fn = lambda a: sg.cross_entropy(a, labels, **options)
    examples = 3 if options.get("reduction") == "sum" else 1
    fd_close(np.sum(d * sg.cross_entropy_hvp(x, labels, d, **options)), second(loss_fn, x, d), loss_fn(x),
             atol=FD2_ATOL, examples=examples)


def test_tape_first_and_second_order_against_finite_differences(tf, tf_run):
    """Gradients into logits, soft labels and temperature, and the tape of a
    tape, against finite differences of softgrad's own values (NumPy) and of
    its own first-order tape."""
    x, d, w, _ = problem(65)
    labels = _labels(66, True)
    t = np.array([[1.5], [1.0], [2.5]])
    dl = np.random.default_rng(67).uniform(-1, 1, labels.shape)
    dt = np.array([[1.0], [-0.5], [0.25]])

    def value(a, y, temperature):
        return (tf.reduce_sum(sg.softmax(a, temperature=temperature) * w)
                + tf.reduce_sum(sg.log_softmax(a, temperature=temperature) * w)
                + sg.cross_entropy(a, y, label_smoothing=0.1, z_loss=0.01))

    def first_order(a, y, temperature):
        """The derivative of value along (d, dl, dt), from the tape."""
        with tf.GradientTape() as tape:
            tape.watch([a, y, temperature])
            total = value(a, y, temperature)
        ga, gy, gt = tape.gradient(total, [a, y, temperature])
        return tf.reduce_sum(ga * d) + tf.reduce_sum(gy * dl) + tf.reduce_sum(gt * dt)

    def second_order(a, y, temperature):
        with tf.GradientTape() as tape:
            tape.watch([a, y, temperature])
            directional = first_order(a, y, temperature)
        ga, gy, gt = tape.gradient(directional, [a, y, temperature])
        return directional, tf.reduce_sum(ga * d) + tf.reduce_sum(gy * dl) + tf.reduce_sum(gt * dt)

    def numpy_value(a, y, temperature):
        return (np.sum(sg.softmax(a, temperature=temperature) * w) + np.sum(sg.log_softmax(a, temperature=temperature) * w)
                + sg.cross_entropy(a, y, label_smoothing=0.1, z_loss=0.01))

    def along(fn):
        """fn(x, labels, t) differentiated along (d, dl, dt) by central differences."""
        return central(lambda s: fn(x + s * d, labels + s * dl, t + s * dt), 0.0, 1.0)

    first, second_ = tf_run(second_order, x, labels, t)
    fd_close(first, along(numpy_value), numpy_value(x, labels, t), examples=2 * x.size)
    tape_first = lambda a, y, temperature: tf_run(first_order, a, y, temperature)
    fd_close(second_, along(tape_first), first, examples=2 * x.size)
