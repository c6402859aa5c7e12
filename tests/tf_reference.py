"""The oracle's formulas as plain TensorFlow ops, for autodiff references.

TensorFlow differentiates these through its own generic rules, so their
gradients (first and second order) are independent of softgrad's closed
forms. Class axis last; use float64.
"""

import numpy as np
import tensorflow as tf


def softmax(x, temperature=1.0):
    z = x / temperature
    e = tf.exp(z - tf.reduce_max(z, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def log_softmax(x, temperature=1.0):
    z = x / temperature
    z = z - tf.reduce_max(z, axis=-1, keepdims=True)
    return z - tf.math.log(tf.reduce_sum(tf.exp(z), axis=-1, keepdims=True))


def logsumexp(x):
    m = tf.reduce_max(x, axis=-1, keepdims=True)
    return (m + tf.math.log(tf.reduce_sum(tf.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def cross_entropy(x, labels, *, weight=None, ignore_index=None, label_smoothing=0.0,
                  reduction="mean", z_loss=0.0):
    """-sum q log_softmax(x) + z_loss lse^2, q = ((1 - eps) Y + eps / C) w; labels int (NumPy) or soft (tensor)."""
    n_classes = x.shape[-1]
    w = tf.ones([n_classes], x.dtype) if weight is None else tf.constant(weight, x.dtype)
    if isinstance(labels, np.ndarray) and np.issubdtype(labels.dtype, np.integer):
        valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
        safe = np.where(valid, labels, 0)
        y = tf.one_hot(safe, n_classes, dtype=x.dtype)
        denominator = tf.reduce_sum(tf.gather(w, safe) * valid)
    else:
        y = labels
        valid = np.ones(x.shape[:-1], bool)
        denominator = tf.constant(float(valid.size), x.dtype)
    q = ((1 - label_smoothing) * y + label_smoothing / n_classes) * w
    per_example = -tf.reduce_sum(q * log_softmax(x), axis=-1) + z_loss * logsumexp(x) ** 2
    per_example = per_example * valid
    if reduction == "none":
        return per_example
    total = tf.reduce_sum(per_example)
    return total if reduction == "sum" else total / denominator
