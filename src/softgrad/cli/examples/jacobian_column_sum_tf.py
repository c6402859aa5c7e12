"""Mistake: the softmax Jacobian summed over an axis, in TensorFlow.

The port of the NumPy version: the off-diagonal −s_i·s_j and the diagonal
s_i(1 − s_i) are assembled with ``tf.linalg.set_diag``, then summed over the
rows. Each column of the Jacobian sums to zero, so the result is all zeros.
"""

import tensorflow as tf


def softmax_grad(logits):
    s = tf.nn.softmax(logits, axis=-1)
    jacobian = -s[:, :, None] * s[:, None, :]
    jacobian = tf.linalg.set_diag(jacobian, s * (1.0 - s))
    return tf.reduce_sum(jacobian, axis=1)
