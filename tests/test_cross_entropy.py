"""cross_entropy and cross_entropy_with_grad: every option against the oracle and PyTorch."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import oracle
import softgrad as sg
from strategies import BACKEND_DTYPES, NUMPY_DTYPES, TF_DTYPES, cast, logits, on_backend, shape_and_axis
from tolerances import assert_close, assert_within, bound, spread


def scales(x, labels, axis=-1, *, weight=None, ignore_index=None, label_smoothing=0.0,
           reduction="mean", z_loss=0.0):
    """(loss scale, gradient scale): what each result's error is relative to.

    Per example, -sum q log p has error sum q_c err(log p_c), and err(log p_c) is
    relative to 1 + |log p_c| (tolerances.py); z lse^2 has error relative to
    2 z (1 + |lse|)^2. A gradient entry S p_i - q_i + 2 z lse p_i has error
    relative to S p_i + q_i + 2 z (1 + |lse|) p_i, and the entry at the row's
    max, computed from the others (#precision), relative to their sum.
    """
    xl, q, valid, denominator = oracle._targets(x, labels, axis, weight, ignore_index, label_smoothing)
    logp, p = oracle.log_softmax(xl), oracle.softmax(xl)
    lse = np.abs(oracle.logsumexp(xl))
    lse = np.where(np.isfinite(lse), lse, 0.0)
    with np.errstate(invalid="ignore"):
        per = np.sum(np.where(q == 0, 0.0, q * (1 + np.abs(logp))), axis=-1) + 2 * z_loss * (1 + lse) ** 2
    per = oracle._reduced(per, valid, denominator, reduction)
    loss = per if reduction == "none" else np.sum(per)
    entry = q.sum(-1, keepdims=True) * p + q + 2 * z_loss * (1 + lse[..., None]) * p
    at_max = np.arange(xl.shape[-1]) == np.argmax(xl, axis=-1)[..., None] if xl.shape[-1] else np.zeros(xl.shape, bool)
    entry = np.where(at_max, entry + np.sum(entry, axis=-1, keepdims=True), entry)
    return loss, np.moveaxis(oracle._reduced(entry, valid, denominator, reduction), -1, axis)


def check(loss, grad, x, labels, dtype, axis=-1, **options):
    loss_scale, grad_scale = scales(x, labels, axis, **options)
    n_classes = np.shape(x)[axis]
    terms = n_classes + int(np.prod(np.shape(x))) // max(n_classes, 1)
    z = spread(x, dtype=dtype, axis=axis)
    assert_close(loss, oracle.cross_entropy(x, labels, axis, **options), dtype=dtype, terms=terms, spread=z,
                 scale=loss_scale, err_msg=f"loss {options}")
    if grad is not None:
        assert_close(grad, oracle.cross_entropy_grad(x, labels, axis, **options), dtype=dtype, terms=terms,
                     spread=z, scale=grad_scale, err_msg=f"gradient {options}")


OPTIONS = [
    dict(weight=w, ignore_index=i, label_smoothing=e, reduction=r, z_loss=z)
    for w, i, e, r, z in itertools.product(
        [None, [0.5, 2.0, 1.0, 0.0, 1.5]], [None, 1], [0.0, 0.2], ["mean", "sum", "none"], [0.0, 0.01]
    )
]


def _problem(seed, shape=(6, 5, 3), axis=1, soft=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, shape)
    batch = shape[:axis] + shape[axis + 1 :]
    if soft:
        y = rng.random(shape) ** 3
        return x, y / y.sum(axis=axis, keepdims=True)
    return x, rng.integers(0, shape[axis], batch)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_integer_labels_every_option(options, dtype):
    x, labels = _problem(20)
    x = cast(x, dtype).astype(np.float64)
    loss = sg.cross_entropy(cast(x, dtype), labels, axis=1, **options)
    loss2, grad = sg.cross_entropy_with_grad(cast(x, dtype), labels, axis=1, **options)
    for out in (loss, loss2, grad):
        assert np.asarray(out).dtype == np.dtype(dtype)
    check(loss, grad, x, labels, dtype, axis=1, **options)
    check(loss2, None, x, labels, dtype, axis=1, **options)


@pytest.mark.parametrize("options", [o for o in OPTIONS if o["ignore_index"] is None], ids=str)
def test_soft_labels_every_option(options):
    x, y = _problem(21, soft=True)
    loss, grad = sg.cross_entropy_with_grad(x, y, axis=1, **options)
    check(loss, grad, x, y, "float64", axis=1, **options)
    check(sg.cross_entropy(x, y, axis=1, **options), None, x, y, "float64", axis=1, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(data=st.data(), dtype=st.sampled_from(NUMPY_DTYPES), soft=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-3]))
def test_matches_oracle(reduction, data, dtype, soft, smoothing, z_loss):
    shape, axis = data.draw(shape_and_axis(max_dims=3, min_classes=1))
    x = data.draw(logits(dtype, shape, extreme=False))
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    if soft:
        y = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
        labels = cast(y, dtype)
    else:
        labels = data.draw(hnp.arrays(np.int64, batch, elements=st.integers(0, shape[axis] - 1)))
    options = dict(label_smoothing=smoothing, reduction=reduction, z_loss=z_loss)
    loss, grad = sg.cross_entropy_with_grad(cast(x, dtype), labels, axis=axis, **options)
    assert np.shape(loss) == (batch if reduction == "none" else ())
    assert grad.shape == shape and grad.dtype == np.dtype(dtype)
    check(loss, grad, x, labels.astype(np.float64) if soft else labels, dtype, axis=axis, **options)


@given(data=st.data(), backend_dtype=st.sampled_from(BACKEND_DTYPES), soft=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_with_grad_equals_the_autodiff_gradient(tf, data, backend_dtype, soft, reduction):
    """cross_entropy_with_grad's gradient = TF autodiff of the plain reference (float64),
    and, for tensors, = autodiff of cross_entropy through softgrad's own custom gradient."""
    ref = pytest.importorskip("tf_reference")
    backend, dtype = backend_dtype
    shape, axis = data.draw(shape_and_axis(max_dims=3, min_classes=1))
    x = data.draw(logits(dtype, shape, extreme=False))
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    if soft:
        labels = cast(data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1))), dtype).astype(np.float64)
    else:
        labels = data.draw(hnp.arrays(np.int64, batch, elements=st.integers(0, shape[axis] - 1)))
    options = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    # "none": each row of dlogits is the gradient of its own loss, i.e. of the sum
    summed = {**options, "reduction": "sum" if reduction == "none" else reduction}
    last = tf.constant(np.moveaxis(x, axis, -1))
    with tf.GradientTape() as tape:
        tape.watch(last)
        y = tf.constant(np.moveaxis(labels, axis, -1)) if soft else labels
        reference_loss = ref.cross_entropy(last, y, **summed)
    reference = np.moveaxis(tape.gradient(reference_loss, last).numpy(), -1, axis)
    args = [on_backend(backend, x, dtype), on_backend(backend, labels, dtype) if soft else labels]
    _, grad = sg.cross_entropy_with_grad(*args, axis=axis, **options)
    _, grad_scale = scales(x, labels, axis, **options)
    n_classes = shape[axis]
    terms = n_classes + int(np.prod(shape)) // n_classes
    z = spread(x, dtype=dtype, axis=axis)
    # the float64 reference has its own float64 error on top of softgrad's
    tol = bound(dtype, terms=terms, spread=z, scale=grad_scale, expected=reference) + bound(
        "float64", terms=terms, spread=z, scale=grad_scale)
    assert_within(grad, reference, tol, err_msg="with_grad")
    if backend == "tensorflow":
        with tf.GradientTape() as tape:
            tape.watch(args[0])
            loss = tf.reduce_sum(sg.cross_entropy(*args, axis=axis, **summed))
        assert_within(tape.gradient(loss, args[0]), reference, tol, err_msg="autodiff of cross_entropy")


@pytest.mark.parametrize("dtype", TF_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_tensorflow_modes(tf, tf_run, dtype, soft):
    x, labels = _problem(22, soft=soft)
    x = cast(x, dtype)
    labels = cast(labels, dtype) if soft else labels.astype(np.int32)
    options = dict(weight=None if soft else [0.5, 2.0, 1.0, 0.0, 1.5], label_smoothing=0.1, z_loss=0.01,
                   ignore_index=None if soft else 2)

    def both(a, y):
        return sg.cross_entropy(a, y, axis=1, **options), sg.cross_entropy_with_grad(a, y, axis=1, **options)

    loss, (loss2, grad) = tf_run(both, x, labels)
    assert loss.dtype.name == dtype and grad.dtype.name == dtype
    y64 = labels.astype(np.float64) if soft else labels
    check(loss, grad, x.astype(np.float64), y64, dtype, axis=1, **options)
    check(loss2, None, x.astype(np.float64), y64, dtype, axis=1, **options)


def test_z_loss_is_unweighted_zero_when_ignored_and_shares_the_mean_denominator():
    x, labels = _problem(23, shape=(8, 5), axis=1)
    labels[[1, 4]] = -100
    weight = np.array([0.5, 2.0, 1.0, 3.0, 1.5])
    options = dict(weight=weight, ignore_index=-100)
    valid = labels != -100
    lse = oracle.logsumexp(x)
    expected = 0.1 * np.sum(lse[valid] ** 2) / np.sum(weight[labels[valid]])
    difference = sg.cross_entropy(x, labels, z_loss=0.1, **options) - sg.cross_entropy(x, labels, **options)
    np.testing.assert_allclose(difference, expected, rtol=1e-13)
    per_example = sg.cross_entropy(x, labels, z_loss=0.1, reduction="none", **options)
    assert np.all(per_example[~valid] == 0)


def test_z_loss_on_a_row_with_no_entry():
    """Regression: lse = -inf times p = 0 made the z-loss gradient and HVP NaN."""
    x = np.array([[0.5, -np.inf, 2.0], [-np.inf, -np.inf, -np.inf]])
    y = np.array([[0.3, 0.0, 0.7], [0.0, 0.0, 0.0]])
    _, grad = sg.cross_entropy_with_grad(x, y, z_loss=0.1)
    hvp = sg.cross_entropy_hvp(x, y, np.ones_like(x), z_loss=0.1)
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_array_equal(hvp[1], 0.0)
    check(sg.cross_entropy(x[:1], y[:1], z_loss=0.1), grad[:1] * 2, x[:1], y[:1], "float64", z_loss=0.1)


@pytest.mark.parametrize("weight", [None, [1.0, 0.0, 2.0]])
def test_mean_over_nothing_is_zero_with_zero_gradient(weight):
    """The one documented difference from PyTorch, which returns NaN."""
    x = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    for labels, ignore in ((np.array([-1, -1]), -1), (np.array([1, 1]), None)):
        if weight is None and ignore is None:
            continue
        loss, grad = sg.cross_entropy_with_grad(x, labels, weight=weight, ignore_index=ignore, z_loss=0.1)
        assert loss == 0 and not np.isnan(loss)
        np.testing.assert_array_equal(grad, np.zeros_like(x))


@pytest.mark.parametrize("reduction, shape", [("mean", ()), ("sum", ()), ("none", (0,))])
def test_empty_batch(reduction, shape):
    x = np.zeros((0, 4), dtype=np.float32)
    loss, grad = sg.cross_entropy_with_grad(x, np.zeros((0,), dtype=np.int64), reduction=reduction)
    assert np.shape(loss) == shape and grad.shape == (0, 4) and grad.dtype == np.float32
    assert np.all(np.asarray(loss) == 0)


def test_single_class():
    """One class: p = 1, the loss is the z-loss alone, the CE gradient 0."""
    x = np.array([[3.0], [-2.0]])
    loss, grad = sg.cross_entropy_with_grad(x, np.array([0, 0]), reduction="none", z_loss=0.5)
    np.testing.assert_allclose(loss, [4.5, 2.0], rtol=1e-15)
    np.testing.assert_allclose(grad, [[3.0], [-2.0]], rtol=1e-15)


torch_cases = [
    dict(weight=w, ignore_index=i, label_smoothing=e, reduction=r)
    for w, i, e, r in itertools.product([None, [0.5, 2.0, 1.0, 0.0, 1.5]], [None, 3], [0.0, 0.3],
                                        ["mean", "sum", "none"])
]


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("options", torch_cases, ids=str)
def test_pytorch_parity(options, soft):
    """weight, ignore_index, label_smoothing and reduction mean what they mean in PyTorch."""
    torch = pytest.importorskip("torch")
    if soft and options["ignore_index"] is not None:
        pytest.skip("soft labels with ignore_index are an error in softgrad (test_errors.py)")
    x, labels = _problem(24, shape=(7, 5, 2), axis=1, soft=soft)
    logits_t = torch.tensor(x, requires_grad=True)
    weight = options["weight"]
    torch_loss = torch.nn.functional.cross_entropy(
        logits_t, torch.tensor(labels), weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
        ignore_index=-100 if options["ignore_index"] is None else options["ignore_index"],
        label_smoothing=options["label_smoothing"], reduction=options["reduction"])
    torch_loss.backward(torch.ones_like(torch_loss))
    loss, grad = sg.cross_entropy_with_grad(x, labels, axis=1, **options)
    loss_scale, grad_scale = scales(x, labels, 1, **options)
    # two independent float64 computations: twice the float64 bound
    assert_close(loss, torch_loss.detach().numpy(), dtype="float64", terms=5 + 14, spread=spread(x, dtype="float64", axis=1),
                 scale=2 * loss_scale)
    assert_close(grad, logits_t.grad.numpy(), dtype="float64", terms=5 + 14,
                 spread=spread(x, dtype="float64", axis=1), scale=2 * grad_scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_summing_to_a_subnormal_number(dtype):
    """Regression: the mean multiplied by 1 / sum(weights), which overflowed to inf.

    Weights are applied in the logits' dtype, so w l and w (p - y) are
    rounded to multiples of a subnormal w: the results are finite, with the
    few bits of precision such a weight carries."""
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=dtype)
    loss, grad = sg.cross_entropy_with_grad(x, np.array([0, 0]), weight=np.array([tiny, 1.0, 1.0], dtype=dtype))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
