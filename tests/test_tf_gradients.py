"""tf.GradientTape through every public function, first and second order,
against TensorFlow's autodiff of the plain reference (tests/tf_reference.py).

All in float64 with |x| <= 3, temperatures in [1/2, 2] and weights in
[-1, 2]; the comparisons are normwise (tolerances.AUTODIFF_SCALE).
"""

import numpy as np
import pytest

import oracle
import softgrad as sg
from tolerances import AUTODIFF_SCALE, assert_close, spread

tf = pytest.importorskip("tensorflow")
ref = pytest.importorskip("tf_reference")

C = 5


def close(actual, expected, x, *, terms=3 * C + 4, err_msg=""):
    """Normwise float64 comparison (see AUTODIFF_SCALE); the default terms count
    a sum over the classes per derivative order (up to three) and one over
    the 4 examples."""
    assert_close(actual, expected, dtype="float64", terms=terms,
                 spread=spread(x, dtype="float64", temperature=0.5), scale=AUTODIFF_SCALE, err_msg=err_msg)


def inputs(seed, shape=(4, C)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, shape)
    weights = rng.uniform(-1, 1, shape)
    t = rng.uniform(0.5, 2.0, shape[:-1] + (1,))
    mask = rng.random(shape) < 0.8
    mask[..., 0] = True
    return x, weights, t, mask


def reference_forward(name, x, t, mask):
    z = tf.where(mask, x / t, tf.constant(-np.inf, x.dtype))
    return (ref.softmax if name == "softmax" else ref.log_softmax)(z)


def _finite(out):
    return tf.where(tf.math.is_inf(out), tf.zeros_like(out), out)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_first_order_into_logits_and_temperature(tf_run, name):
    x, w, t, mask = inputs(40)
    fn = getattr(sg, name)

    def grads(a, temperature):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([a, temperature])
            ours = tf.reduce_sum(_finite(fn(a, temperature=temperature, where=mask)) * w)
            theirs = tf.reduce_sum(_finite(reference_forward(name, a, temperature, mask)) * w)
        return tape.gradient(ours, [a, temperature]), tape.gradient(theirs, [a, temperature])

    (gx, gt), (rx, rt) = tf_run(grads, x, t)
    close(gx, rx, x, err_msg="d/dx")
    close(gt, rt, x, err_msg="d/dT")
    assert np.all(gx[~mask] == 0), "masked entries receive zero gradient"


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "softmax_jacobian", "log_softmax_jacobian"])
def test_fully_masked_rows_have_zero_gradients(tf_run, name):
    """Values 0 / -inf, first and second derivatives 0 (logits and temperature), never NaN."""
    x, w, t, mask = inputs(49)
    mask[1] = False
    fn = getattr(sg, name)

    def derivatives(a, temperature):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([a, temperature])
            with tf.GradientTape(persistent=True) as inner:
                inner.watch([a, temperature])
                out = fn(a, temperature=temperature, where=mask)
                value = tf.reduce_sum(_finite(out) * (w if out.shape == w.shape else 1.0))
            first = inner.gradient(value, [a, temperature])
            directional = tf.reduce_sum(first[0] * w) + tf.reduce_sum(first[1])
        return out, first, outer.gradient(directional, [a, temperature])

    out, first, second = tf_run(derivatives, x, t)
    assert np.all(out[1] == (-np.inf if name == "log_softmax" else 0.0))
    for g in first + second:
        assert not np.isnan(g).any()
        assert np.all(g[1] == 0), g[1]


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_second_order_tape_of_tape(tf_run, name):
    x, w, t, mask = inputs(41)
    v = np.random.default_rng(1).normal(size=x.shape)
    fn = getattr(sg, name)

    def hessian_vector(forward):
        def run(a, temperature):
            with tf.GradientTape(persistent=True) as outer:
                outer.watch([a, temperature])
                with tf.GradientTape() as inner:
                    inner.watch(a)
                    value = tf.reduce_sum(_finite(forward(a, temperature)) * w)
                directional = tf.reduce_sum(inner.gradient(value, a) * v)
            return outer.gradient(directional, [a, temperature])
        return run

    ours = tf_run(hessian_vector(lambda a, tt: fn(a, temperature=tt, where=mask)), x, t)
    theirs = tf_run(hessian_vector(lambda a, tt: reference_forward(name, a, tt, mask)), x, t)
    close(ours[0], theirs[0], x, err_msg="d2/dx2")
    close(ours[1], theirs[1], x, err_msg="d2/dxdT")


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_jacobian_equals_batch_jacobian_of_the_reference(tf_run, name):
    x, _, t, _ = inputs(42)
    jac_fn = getattr(sg, f"{name}_jacobian")
    forward = ref.softmax if name == "softmax" else ref.log_softmax

    def both(a, temperature):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(a)
            theirs = forward(a, temperature)
            ours = getattr(sg, name)(a, temperature=temperature)
        return jac_fn(a, temperature=temperature), tape.batch_jacobian(theirs, a), tape.batch_jacobian(ours, a)

    jac, reference, autodiff_of_ours = tf_run(both, x, t)
    close(jac, reference, x)
    close(autodiff_of_ours, reference, x)


def test_jacobian_with_class_axis_first_equals_tape_jacobian(tf_run):
    x = np.random.default_rng(43).uniform(-3, 3, (C, 2, 3))

    def both(a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            theirs = tf.transpose(ref.softmax(tf.transpose(a, [1, 2, 0])), [2, 0, 1])
        full = tape.jacobian(theirs, a)  # (C, 2, 3, C, 2, 3)
        return sg.softmax_jacobian(a, axis=0), full

    jac, full = tf_run(both, x)
    diagonal = np.einsum("iabjab->abij", full)
    close(jac, diagonal, x)


PRODUCTS = {
    "softmax_vjp": (lambda y, d: y * (d - tf.reduce_sum(d * y, -1, keepdims=True)), "softmax"),
    "softmax_jvp": (lambda y, d: y * (d - tf.reduce_sum(y * d, -1, keepdims=True)), "softmax"),
    "log_softmax_vjp": (lambda lp, d: d - tf.exp(lp) * tf.reduce_sum(d, -1, keepdims=True), "log_softmax"),
    "log_softmax_jvp": (lambda lp, d: d - tf.reduce_sum(tf.exp(lp) * d, -1, keepdims=True), "log_softmax"),
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_products_match_autodiff_of_the_reference(tf_run, name):
    """VJP = tape.gradient with output_gradients; JVP = the forward accumulator's product."""
    x, d, _, _ = inputs(44)
    kind = PRODUCTS[name][1]
    forward = ref.softmax if kind == "softmax" else ref.log_softmax

    def both(a, cotangent):
        if name.endswith("vjp"):
            with tf.GradientTape() as tape:
                tape.watch(a)
                out = forward(a)
            reference = tape.gradient(out, a, output_gradients=cotangent)
        else:
            with tf.autodiff.ForwardAccumulator(a, cotangent) as acc:
                out = forward(a)
            reference = acc.jvp(out)
        return getattr(sg, name)(out, cotangent), reference

    ours, reference = tf_run(both, x, d)
    close(ours, reference, x)


@pytest.mark.parametrize("name", PRODUCTS)
def test_products_are_differentiable(tf_run, name):
    """First and second derivatives of product(forward(x), d) in x and d match the reference's.

    The products are composed with the forward pass because y only means
    something on the simplex (sum y = 1): off it, the exact rewrites of
    #precision differ from the plain formula, and so do their derivatives.
    """
    x, d, _, _ = inputs(45)
    w = np.random.default_rng(2).uniform(-1, 1, x.shape)
    formula, kind = PRODUCTS[name]

    def derivatives(forward, product):
        def run(a, cotangent):
            with tf.GradientTape(persistent=True) as outer:
                outer.watch([a, cotangent])
                with tf.GradientTape(persistent=True) as inner:
                    inner.watch([a, cotangent])
                    value = tf.reduce_sum(product(forward(a), cotangent) * w)
                first = inner.gradient(value, [a, cotangent])
                directional = tf.reduce_sum(first[0] * w) + tf.reduce_sum(first[1] * w)
            return first, outer.gradient(directional, [a, cotangent])
        return run

    ours = tf_run(derivatives(getattr(sg, kind), getattr(sg, name)), x, d)
    theirs = tf_run(derivatives(ref.softmax if kind == "softmax" else ref.log_softmax, formula), x, d)
    for a, b, what in zip(ours[0] + ours[1], theirs[0] + theirs[1], ["dx", "dd", "d2x", "d2d"]):
        close(a, np.zeros_like(a) if b is None else b, x, err_msg=what)


CE_OPTIONS = [
    dict(),
    dict(weight=[0.5, 2.0, 1.0, 0.0, 1.5], ignore_index=1, label_smoothing=0.1, z_loss=0.01),
    dict(label_smoothing=0.2, reduction="sum", z_loss=0.02),
    dict(weight=[0.5, 2.0, 1.0, 0.0, 1.5], reduction="none"),
]


def _labels(seed, soft):
    rng = np.random.default_rng(seed)
    if soft:
        y = rng.random((4, C))
        return y / y.sum(-1, keepdims=True)
    return rng.integers(0, C, 4)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_cross_entropy_first_and_second_order(tf_run, options, soft):
    """Gradients into logits and soft labels; the gradient of the gradient; with_grad = autodiff."""
    if soft and "ignore_index" in options:
        options = {k: v for k, v in options.items() if k != "ignore_index"}
    x, w, _, _ = inputs(46)
    v = np.random.default_rng(3).normal(size=x.shape)
    labels = _labels(47, soft)
    wl = w[:, 0] if options.get("reduction") == "none" else 1.0

    def derivatives(loss_fn):
        def run(a, y, b):
            watched = [a, y] if soft else [a]
            with tf.GradientTape(persistent=True) as outer:
                outer.watch(watched)
                with tf.GradientTape(persistent=True) as inner:
                    inner.watch(watched)
                    loss = tf.reduce_sum(loss_fn(a, y) * wl)
                first = inner.gradient(loss, watched)
                directional = tf.reduce_sum(first[0] * b)
            return loss, first, outer.gradient(directional, watched)
        return run

    label_arg = labels if soft else labels.astype(np.int64)
    ours = tf_run(derivatives(lambda a, y: sg.cross_entropy(a, y, **options)), x, label_arg, v)
    theirs = tf_run(derivatives(lambda a, y: ref.cross_entropy(a, labels if not soft else y, **options)),
                    x, label_arg, v)
    close(ours[0], theirs[0], x, err_msg="loss")
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, x, err_msg="first order")
    for a, b in zip(ours[2], theirs[2]):
        close(a, b, x, err_msg="second order")
    if soft:
        grad_y = oracle.cross_entropy_soft_label_grad(x, labels, **options)
        close(ours[1][1], grad_y * (wl if np.ndim(wl) == 0 else wl[:, None]), x, err_msg="d/d labels")

    # with reduction="none" each row of dlogits is the gradient of its own
    # loss, which is the gradient of their sum
    reduced = {**options, "reduction": "sum"} if options.get("reduction") == "none" else options

    def reference_grad(a, y):
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = ref.cross_entropy(a, y if soft else labels, **reduced)
        return tape.gradient(loss, a)

    fused = tf_run(lambda a, y: sg.cross_entropy_with_grad(a, y, **options)[1], x, label_arg)
    close(fused, tf_run(reference_grad, x, label_arg), x, err_msg="with_grad")


@pytest.mark.parametrize("soft", [False, True])
def test_with_grad_and_hvp_are_differentiable(tf_run, soft):
    """Gradients of the fused gradient and of the HVP match nested tapes of the reference."""
    x, w, _, _ = inputs(48)
    v = np.random.default_rng(4).normal(size=x.shape)
    labels = _labels(49, soft)
    options = dict(label_smoothing=0.1, z_loss=0.01)

    def reference_grad_and_hvp(a, y, b):
        with tf.GradientTape() as t2:
            t2.watch(a)
            with tf.GradientTape() as t1:
                t1.watch(a)
                loss = ref.cross_entropy(a, y if soft else labels, **options)
            grad = t1.gradient(loss, a)
            directional = tf.reduce_sum(grad * b)
        return grad, t2.gradient(directional, a)

    def ours_grad_and_hvp(a, y, b):
        return sg.cross_entropy_with_grad(a, y, **options)[1], sg.cross_entropy_hvp(a, y, b, **options)

    def outer(fn):
        def run(a, y, b):
            watched = [a, y, b] if soft else [a, b]
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(watched)
                grad, hvp = fn(a, y, b)
                value = tf.reduce_sum(grad * w) + tf.reduce_sum(hvp * w)
            return [tape.gradient(value, u) for u in watched]
        return run

    label_arg = labels if soft else labels.astype(np.int64)
    ours = tf_run(outer(ours_grad_and_hvp), x, label_arg, v)
    theirs = tf_run(outer(reference_grad_and_hvp), x, label_arg, v)
    for a, b in zip(ours, theirs):
        close(a, b, x)


def test_temperature_calibration_by_gradient_descent(tf):
    """Fit T by gradient descent on the NLL through log_softmax's temperature; compare
    with the minimiser found by bisection on the oracle's derivative."""
    rng = np.random.default_rng(50)
    x = rng.normal(0, 3, (400, 6))
    p_true = oracle.softmax(x / 2.5)
    labels = np.array([rng.choice(6, p=row) for row in p_true])

    def nll_grad(t):
        """d/dT mean(-log p_label) = mean(z_label - E_p[z]) / T^2, z = x - max x."""
        z = x - x.max(-1, keepdims=True)
        p = oracle.softmax(x, temperature=t)
        return np.mean(z[np.arange(len(z)), labels] - np.sum(p * z, -1)) / t**2

    lo, hi = 0.5, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if nll_grad(mid) < 0 else (lo, mid)
    best = (lo + hi) / 2

    log_t = tf.Variable(0.0, dtype=tf.float64)
    picked = tf.constant(np.stack([np.arange(len(labels)), labels], 1))
    optimizer = tf.keras.optimizers.SGD(learning_rate=0.5)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logp = sg.log_softmax(tf.constant(x), temperature=tf.exp(log_t))
            loss = -tf.reduce_mean(tf.gather_nd(logp, picked))
        optimizer.apply_gradients([(tape.gradient(loss, log_t), log_t)])

    for _ in range(300):
        step()
    assert abs(np.exp(log_t.numpy()) - best) < 1e-4 * best, (np.exp(log_t.numpy()), best)
