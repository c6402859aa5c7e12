"""Bad input raises SoftgradError (a ValueError and a TypeError) naming the value."""

import re

import numpy as np
import pytest

import softgrad as sg
from softgrad import SoftgradError

X = np.zeros((2, 3, 4))
FORWARD = [sg.softmax, sg.log_softmax, sg.softmax_jacobian, sg.log_softmax_jacobian]
PRODUCTS = [sg.softmax_vjp, sg.softmax_jvp, sg.log_softmax_vjp, sg.log_softmax_jvp]


def raises(*fragments):
    """pytest.raises(SoftgradError) whose message contains every fragment."""
    return pytest.raises(SoftgradError, match="".join(f"(?=[\\s\\S]*{re.escape(str(f))})" for f in fragments))


def test_is_a_value_error_and_a_type_error():
    assert issubclass(SoftgradError, ValueError) and issubclass(SoftgradError, TypeError)


@pytest.mark.parametrize("axis", [3, 7, -4, -9])
def test_axis_out_of_range(axis):
    for fn in FORWARD:
        with raises(axis, "ndim", 3):
            fn(X, axis=axis)
    for fn in PRODUCTS:
        with raises(axis, "ndim", 3):
            fn(X, X, axis=axis)
    with raises(axis, "ndim", 3):
        sg.cross_entropy(X, np.zeros((2, 3), dtype=np.int64), axis=axis)
    with raises(axis, "ndim", 3):
        sg.cross_entropy_hvp(X, X, X, axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_axis_not_an_int(axis):
    with raises(repr(axis)):
        sg.softmax(X, axis=axis)


def test_scalar_logits_have_no_class_axis():
    with pytest.raises(SoftgradError):
        sg.softmax(3.0)


@pytest.mark.parametrize("labels, expected_shape", [
    (np.zeros((2, 4), dtype=np.int64), (2, 3)),
    (np.zeros((2, 3, 1), dtype=np.int64), (2, 3)),
    (np.zeros((3, 2), dtype=np.int64), (2, 3)),
    (np.zeros((2, 3, 5)), (2, 3, 4)),
    (np.zeros((2, 4)), (2, 3, 4)),
])
def test_labels_of_the_wrong_shape(labels, expected_shape):
    for fn in (sg.cross_entropy, sg.cross_entropy_with_grad):
        with raises(labels.shape, expected_shape):
            fn(X, labels)
    with raises(labels.shape, expected_shape):
        sg.cross_entropy_hvp(X, labels, X)


def test_hvp_direction_of_the_wrong_shape():
    with raises((2, 3, 5)):
        sg.cross_entropy_hvp(X, np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3, 5)))


@pytest.mark.parametrize("value, position", [(4, (1, 2)), (-1, (0, 1)), (17, (0, 0))])
def test_integer_labels_out_of_range_name_value_and_position(value, position):
    labels = np.zeros((2, 3), dtype=np.int64)
    labels[position] = value
    pattern = rf"{value}[\s\S]*{position[0]},\s*{position[1]}|{position[0]},\s*{position[1]}[\s\S]*{value}"
    for fn in (sg.cross_entropy, sg.cross_entropy_with_grad):
        with pytest.raises(SoftgradError, match=pattern):
            fn(X, labels)
        with pytest.raises(SoftgradError, match=pattern):
            fn(X, labels, ignore_index=-100)
    with pytest.raises(SoftgradError, match=pattern):
        sg.cross_entropy_hvp(X, labels, X)


def test_ignore_index_may_be_out_of_range():
    labels = np.array([[0, -100, 3], [-100, 1, 2]])
    loss = sg.cross_entropy(X, labels, ignore_index=-100)
    assert np.isclose(loss, np.log(4))


def test_labels_out_of_range_tensorflow(tf, tf_run_graph):
    """Eagerly a SoftgradError naming the value; in a graph a tf.debugging assertion."""
    labels = np.array([[0, 1, 4], [2, 3, 1]], dtype=np.int32)
    x = np.zeros((2, 3, 4), dtype=np.float32)
    if tf_run_graph.mode == "eager":
        with pytest.raises(SoftgradError, match=r"4[\s\S]*0,\s*2|0,\s*2[\s\S]*4"):
            tf_run_graph(lambda a, y: sg.cross_entropy(a, y), x, labels)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="4"):
            tf_run_graph(lambda a, y: sg.cross_entropy(a, y), x, labels)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.complex128, np.uint8])
def test_integer_bool_or_complex_logits(dtype):
    x = np.zeros((2, 3), dtype=dtype)
    for fn in FORWARD:
        with raises(np.dtype(dtype).name):
            fn(x)
    with raises(np.dtype(dtype).name):
        sg.cross_entropy(x, np.zeros(2, dtype=np.int64))
    with raises(np.dtype(dtype).name):
        sg.softmax_vjp(x, np.zeros((2, 3)))


@pytest.mark.parametrize("dtype", ["int32", "int64", "complex64", "bool"])
def test_integer_bool_or_complex_tensors(tf, dtype):
    x = tf.zeros((2, 3), dtype=dtype)
    for fn in FORWARD:
        with raises(dtype):
            fn(x)
    with raises(dtype):
        sg.cross_entropy(x, tf.zeros(2, dtype=tf.int32))


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.0, float("nan"), -np.inf])
def test_temperature_not_positive(temperature):
    for fn in FORWARD:
        with raises(repr(temperature)):
            fn(X, temperature=temperature)


def test_temperature_array_with_a_non_positive_entry():
    t = np.ones((2, 3, 1))
    t[1, 2, 0] = -0.5
    for fn in FORWARD:
        with raises("-0.5"):
            fn(X, temperature=t)


def test_temperature_must_have_size_one_on_the_class_axis():
    for fn in FORWARD:
        with raises((2, 3, 4)):
            fn(X, temperature=np.ones((2, 3, 4)))
        with raises((4,)):
            fn(X, temperature=np.ones(4))


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "batchmean"])
def test_unknown_reduction_lists_the_valid_ones(reduction):
    for fn in (sg.cross_entropy, sg.cross_entropy_with_grad):
        with raises(repr(reduction), "mean", "sum", "none"):
            fn(X, np.zeros((2, 3), dtype=np.int64), reduction=reduction)
    with raises(repr(reduction), "mean", "sum", "none"):
        sg.cross_entropy_hvp(X, np.zeros((2, 3), dtype=np.int64), X, reduction=reduction)


@pytest.mark.parametrize("length", [3, 5, 1])
def test_weight_of_the_wrong_length(length):
    for fn in (sg.cross_entropy, sg.cross_entropy_with_grad):
        with raises(f"({length},)", 4):
            fn(X, np.zeros((2, 3), dtype=np.int64), weight=np.ones(length))


def test_soft_labels_with_ignore_index():
    with raises("ignore_index", -100):
        sg.cross_entropy(X, np.full(X.shape, 0.25), ignore_index=-100)


def test_where_that_does_not_broadcast():
    with raises((2, 5)):
        sg.softmax(X, where=np.ones((2, 5), dtype=bool))


def test_label_smoothing_out_of_range():
    for eps in (-0.1, 1.5):
        with raises(eps):
            sg.cross_entropy(X, np.zeros((2, 3), dtype=np.int64), label_smoothing=eps)
