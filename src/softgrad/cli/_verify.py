"""``softgrad train --verify``: hand-written gradients against tf.GradientTape.

The reference is autodiff of the same model, built from plain TensorFlow ops
(``tf.nn.sparse_softmax_cross_entropy_with_logits``, not softgrad), in float64
on the exact same float32 numbers, so its own error is negligible. The
tolerance is a first-order rounding-error bound for the float32 hand-written
pass, derived in docs/cli.md#how-train---verify-decides:

    |hand − autodiff| ≤ γ_n · S,   γ_n = n·u / (1 − n·u),

with u the float32 unit roundoff, n = inputs + hidden + classes + batch + 8 the
longest chain of rounded sums and few-ulp functions, and S the magnitudes the
backward pass multiplies, propagated with absolute values.
"""

import numpy as np

import softgrad as sg
from softgrad.cli._util import CliError

_UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2


class GradientCheck:
    """Compares every step's gradients; raises CliError on the first mismatch."""

    def __init__(self, tf):
        self.tf = tf
        self.steps = 0
        self.worst = 0.0  # largest |hand − autodiff| / bound seen

    def __call__(self, params, x, labels, grads):
        self.steps += 1
        p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        x64, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
        auto = self._autodiff(p, x64, labels)
        bounds = error_bound(p, x64, labels)
        for name, bound in bounds.items():
            error = np.abs(np.asarray(grads[name], dtype=np.float64) - auto[name])
            # Constant pixels give exact zeros on both sides, with a zero bound.
            with np.errstate(divide="ignore"):
                ratio = np.divide(error, bound, out=np.zeros_like(error), where=error != 0)
            self.worst = max(self.worst, float(ratio.max()))
            if not (ratio <= 1.0).all():
                raise CliError(_mismatch(self.steps, name, error, bound, ratio), exit_code=1)

    def _autodiff(self, p, x, labels):
        tf = self.tf
        variables = {k: tf.constant(v) for k, v in p.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(variables.values()))
            h = tf.tanh(x @ variables["w1"] + variables["b1"])
            logits = h @ variables["w2"] + variables["b2"]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return {k: g.numpy() for k, g in tape.gradient(loss, variables).items()}

    def summary(self):
        return (f"verify: {self.steps} steps, every hand-written gradient within its bound of "
                f"tf.GradientTape autodiff (largest error: {self.worst:.1%} of the bound)")


def error_bound(p, x, labels):
    """Per-entry bounds on the float32 rounding error of backprop in _mlp.py."""
    batch, n_in = x.shape
    hidden, classes = p["w2"].shape
    h = np.tanh(x @ p["w1"] + p["b1"])
    prob = sg.softmax(h @ p["w2"] + p["b2"])
    onehot = np.eye(classes)[labels]
    abs_w1, abs_w2 = np.abs(p["w1"]), np.abs(p["w2"])
    err_h = np.abs(x) @ abs_w1 + np.abs(p["b1"]) + np.abs(h)  # tanh is 1-Lipschitz
    err_z = err_h @ abs_w2 + np.abs(p["b2"])
    # softmax: |Δp_i| ≤ p_i·(|Δz_i| + max_j |Δz_j|), plus the rounding of p − y
    err_delta = (prob * (1.0 + 2.0 * err_z.max(axis=1, keepdims=True)) + onehot) / batch
    delta = np.abs(prob - onehot) / batch
    dh = delta @ abs_w2.T
    err_dh = (err_delta + delta) @ abs_w2.T
    err_dpre = err_dh + dh * (1.0 + 2.0 * np.abs(h) * err_h)  # d(1 − h²) = −2h·dh
    n = n_in + hidden + classes + batch + 8
    gamma = n * _UNIT_ROUNDOFF / (1.0 - n * _UNIT_ROUNDOFF)
    return {
        "w1": gamma * (np.abs(x).T @ err_dpre), "b1": gamma * err_dpre.sum(axis=0),
        "w2": gamma * (err_h.T @ delta + np.abs(h).T @ err_delta),
        "b2": gamma * err_delta.sum(axis=0),
    }


def _mismatch(step, name, error, bound, ratio):
    where = np.unravel_index(np.nanargmax(np.where(np.isnan(ratio), np.inf, ratio)), ratio.shape)
    entry = ", ".join(str(int(i)) for i in where)
    return (f"--verify FAILED at step {step}: the hand-written gradient of {name}[{entry}] "
            f"differs from tf.GradientTape autodiff by {error[where]:.3g}, above its bound "
            f"{bound[where]:.3g}")
