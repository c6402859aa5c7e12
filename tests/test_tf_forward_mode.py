"""Forward-mode autodiff is refused with a clear message, never answered wrongly."""

import numpy as np
import pytest

import softgrad as sg

tf = pytest.importorskip("tensorflow")


@pytest.mark.parametrize("op", [sg.softmax, sg.log_softmax, lambda x: sg.cross_entropy(x, tf.constant([0, 2]))])
def test_forward_accumulator_raises_and_points_to_the_jvp(op):
    x = tf.constant(np.arange(6.0).reshape(2, 3))
    with pytest.raises(NotImplementedError, match="GradientTape.*softmax_jvp"):
        with tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)):
            op(x)
