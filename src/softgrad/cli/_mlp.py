"""A one-hidden-layer softmax classifier with backprop and Adam written by hand.

The same code runs on NumPy arrays and TensorFlow tensors: the few operations
that differ between the two live in a small ``ops`` object. The output layer
uses softgrad's fused cross-entropy gradient, the "delta = (p − y)/N" path.
"""

import numpy as np

import softgrad as sg


class NumpyOps:
    name = "numpy"

    def floats(self, a):
        return np.asarray(a, dtype=np.float32)

    def ints(self, a):
        return np.asarray(a)

    def numpy(self, a):
        return np.asarray(a)

    def take(self, a, rows):
        return a[rows]

    def matmul_tn(self, a, b):
        return a.T @ b

    def matmul_nt(self, a, b):
        return a @ b.T

    def colsum(self, a):
        return a.sum(axis=0)

    tanh = staticmethod(np.tanh)
    sqrt = staticmethod(np.sqrt)


class TensorFlowOps:
    name = "tensorflow"

    def __init__(self, tf):
        self.tf = tf

    def floats(self, a):
        return self.tf.constant(np.asarray(a, dtype=np.float32))

    def ints(self, a):
        return self.tf.constant(np.asarray(a))

    def numpy(self, a):
        return a.numpy()

    def take(self, a, rows):
        return self.tf.gather(a, rows)

    def matmul_tn(self, a, b):
        return self.tf.linalg.matmul(a, b, transpose_a=True)

    def matmul_nt(self, a, b):
        return self.tf.linalg.matmul(a, b, transpose_b=True)

    def colsum(self, a):
        return self.tf.reduce_sum(a, axis=0)

    def tanh(self, a):
        return self.tf.tanh(a)

    def sqrt(self, a):
        return self.tf.sqrt(a)


def init_params(ops, rng, n_in, hidden, n_out):
    """Glorot-uniform weights, zero biases; the same numbers on every backend."""

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out))

    return {
        "w1": ops.floats(glorot(n_in, hidden)), "b1": ops.floats(np.zeros(hidden)),
        "w2": ops.floats(glorot(hidden, n_out)), "b2": ops.floats(np.zeros(n_out)),
    }


def forward(ops, params, x):
    """(hidden activations, logits)."""
    h = ops.tanh(x @ params["w1"] + params["b1"])
    return h, h @ params["w2"] + params["b2"]


def backprop(ops, params, x, labels):
    """(mean loss, logits, gradients), the gradients derived by hand."""
    h, logits = forward(ops, params, x)
    loss, delta = sg.cross_entropy_with_grad(logits, labels)  # delta = (p − y)/N
    dh = ops.matmul_nt(delta, params["w2"])
    dpre = dh * (1.0 - h * h)  # tanh' = 1 − tanh²
    grads = {
        "w1": ops.matmul_tn(x, dpre), "b1": ops.colsum(dpre),
        "w2": ops.matmul_tn(h, delta), "b2": ops.colsum(delta),
    }
    return loss, logits, grads


class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction, on a dict of parameters."""

    def __init__(self, ops, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.ops, self.lr, self.beta1, self.beta2, self.eps = ops, lr, beta1, beta2, eps
        self.m = {k: 0.0 * v for k, v in params.items()}
        self.v = {k: 0.0 * v for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        """The parameters after one update (the inputs are not modified)."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr_t = self.lr * np.sqrt(1.0 - b2**self.t) / (1.0 - b1**self.t)
        updated = {}
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * g
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * g * g
            updated[k] = params[k] - lr_t * self.m[k] / (self.ops.sqrt(self.v[k]) + self.eps)
        return updated
