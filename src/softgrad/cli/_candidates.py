"""The quantities a hand-written softmax derivative might compute.

Every candidate is computed with softgrad's own functions, in float64, from
the same inputs the user's function gets. A candidate is "correct" when it is
a right answer for what a function of that signature claims to compute.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

import softgrad as sg

_VJP_FIX = "dx = softgrad.softmax_vjp(softgrad.softmax(x), dy)"
_ZERO_WHY = (
    "Your function returns zeros because each row of the softmax Jacobian sums to "
    "zero (and so does each column: J = diag(s) − s sᵀ is symmetric). Summing J over "
    "an axis, or applying it to a vector of ones, gives 0 for any logits, and training "
    "silently stalls. Instead, backprop needs Jᵀ·dy (softgrad.softmax_vjp): the Jacobian "
    "applied to the upstream gradient dy, s ⊙ (dy − ⟨dy, s⟩), which never builds J."
)
_DIAG_WHY = (
    "This is only the diagonal of the Jacobian, ∂s_i/∂x_i = s_i(1 − s_i). It drops the "
    "off-diagonal terms −s_i·s_j: raising one logit lowers every other probability. "
    "Backprop needs the whole Jacobian applied to dy, Jᵀ·dy = s ⊙ (dy − ⟨dy, s⟩)."
)


@dataclass(frozen=True)
class Case:
    """One input to the user's function, in float64."""

    title: str
    x: np.ndarray
    dy: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Candidate:
    name: str
    compute: Callable[[Case], np.ndarray]
    correct: bool
    why: str
    fix: str


def candidates(kind, reduction="mean"):
    """The candidates for a function of this kind, most telling first."""
    if kind == "labels":
        return _labels(reduction)
    return _logits() if kind == "logits" else _upstream()


def _jacobian(case):
    return sg.softmax_jacobian(case.x)


def _log_jacobian(case):
    return sg.log_softmax_jacobian(case.x)


def _diagonal(matrix):
    return np.diagonal(matrix, axis1=-2, axis2=-1)


def _vjp_of_ones(case):
    s = sg.softmax(case.x)
    return sg.softmax_vjp(s, np.ones_like(s))


def _logits():
    return [
        Candidate("softmax Jacobian J[n,i,j] = ∂s_i/∂x_j", _jacobian, True,
                  "This is the full softmax Jacobian, and it is right. Backprop never needs it, "
                  "though: it costs N·C² numbers, and a backward pass only uses Jᵀ·dy, "
                  "which softgrad.softmax_vjp computes in O(N·C).",
                  f"J = softgrad.softmax_jacobian(x); for backprop: {_VJP_FIX}"),
        Candidate("its transpose Jᵀ (equal to J: J is symmetric)",
                  lambda c: np.swapaxes(_jacobian(c), -1, -2), True,
                  "This is the transposed softmax Jacobian, which equals J because J is "
                  "symmetric. Backprop only needs Jᵀ·dy (softgrad.softmax_vjp), O(N·C).",
                  f"J = softgrad.softmax_jacobian(x); for backprop: {_VJP_FIX}"),
        Candidate("the diagonal only, s(1 − s)", lambda c: _diagonal(_jacobian(c)), False,
                  _DIAG_WHY, _VJP_FIX),
        Candidate("J's column sums J.sum(axis=-2), identically 0",
                  lambda c: _jacobian(c).sum(axis=-2), False, _ZERO_WHY, _VJP_FIX),
        Candidate("J's row sums J.sum(axis=-1), identically 0",
                  lambda c: _jacobian(c).sum(axis=-1), False, _ZERO_WHY, _VJP_FIX),
        Candidate("the VJP of a ones cotangent, Jᵀ·1 = 0", _vjp_of_ones, False, _ZERO_WHY, _VJP_FIX),
        Candidate("log-softmax Jacobian ∂log s_i/∂x_j = δ_ij − s_j", _log_jacobian, True,
                  "This is the Jacobian of log_softmax, and it is right if log-softmax is what "
                  "you differentiate. Backprop only needs Jᵀ·dy: softgrad.log_softmax_vjp, O(N·C).",
                  "J = softgrad.log_softmax_jacobian(x); for backprop: "
                  "dx = softgrad.log_softmax_vjp(softgrad.log_softmax(x), dy)"),
        Candidate("the log-softmax Jacobian transposed, δ_ij − s_i",
                  lambda c: np.swapaxes(_log_jacobian(c), -1, -2), False,
                  "This is the log-softmax Jacobian transposed: entry [i, j] must be "
                  "∂log s_i/∂x_j = δ_ij − s_j. Unlike softmax's, this Jacobian is not symmetric.",
                  "J = softgrad.log_softmax_jacobian(x)"),
        Candidate("the log-softmax Jacobian's diagonal only, 1 − s",
                  lambda c: _diagonal(_log_jacobian(c)), False,
                  "This is only the diagonal of the log-softmax Jacobian; the off-diagonal "
                  "terms −s_j matter. Backprop needs dy − s·Σdy (softgrad.log_softmax_vjp).",
                  "dx = softgrad.log_softmax_vjp(softgrad.log_softmax(x), dy)"),
        Candidate("softmax itself, s", lambda c: sg.softmax(c.x), False,
                  "This is the softmax itself, not a derivative.", _VJP_FIX),
    ]


def _upstream():
    def s(case):
        return sg.softmax(case.x)

    return [
        Candidate("the VJP Jᵀ·dy = s ⊙ (dy − ⟨dy, s⟩)",
                  lambda c: sg.softmax_vjp(s(c), c.dy), True,
                  "This is Jᵀ·dy, exactly what backprop needs, in O(N·C).", _VJP_FIX),
        Candidate("the JVP J·dy (equal to the VJP: J is symmetric)",
                  lambda c: sg.softmax_jvp(s(c), c.dy), True,
                  "This is J·dy, which equals the VJP Jᵀ·dy that backprop needs because the "
                  "softmax Jacobian is symmetric.", _VJP_FIX),
        Candidate("the diagonal only, s(1 − s) ⊙ dy",
                  lambda c: _diagonal(_jacobian(c)) * c.dy, False, _DIAG_WHY, _VJP_FIX),
        Candidate("J's column sums times dy, identically 0",
                  lambda c: _jacobian(c).sum(axis=-2) * c.dy, False, _ZERO_WHY, _VJP_FIX),
        Candidate("the VJP of a ones cotangent, Jᵀ·1 = 0", _vjp_of_ones, False, _ZERO_WHY, _VJP_FIX),
        Candidate("s ⊙ dy (the −⟨dy, s⟩ term forgotten)", lambda c: s(c) * c.dy, False,
                  "This is s ⊙ dy: it forgets the term −s·⟨dy, s⟩ that comes from the "
                  "normalisation. Backprop needs s ⊙ (dy − ⟨dy, s⟩).", _VJP_FIX),
        Candidate("the log-softmax VJP dy − s·Σdy",
                  lambda c: sg.log_softmax_vjp(sg.log_softmax(c.x), c.dy), True,
                  "This is the VJP of log_softmax, Jᵀ·dy = dy − s·Σdy: right for backprop "
                  "through a log-softmax.",
                  "dx = softgrad.log_softmax_vjp(softgrad.log_softmax(x), dy)"),
        Candidate("the log-softmax JVP dy − ⟨s, dy⟩",
                  lambda c: sg.log_softmax_jvp(sg.log_softmax(c.x), c.dy), False,
                  "This is the log-softmax JVP J·dx, the forward-mode product. Backprop "
                  "needs the transpose, Jᵀ·dy = dy − s·Σdy; the two differ because the "
                  "log-softmax Jacobian is not symmetric.",
                  "dx = softgrad.log_softmax_vjp(softgrad.log_softmax(x), dy)"),
    ]


def _labels(reduction):
    def grad(case, how):
        return sg.cross_entropy_with_grad(case.x, case.labels, reduction=how)[1]

    mean_is_right = reduction == "mean"
    fix = f'loss, dx = softgrad.cross_entropy_with_grad(x, labels, reduction="{reduction}")'
    return [
        Candidate("the mean cross-entropy gradient (p − y)/N", lambda c: grad(c, "mean"),
                  mean_is_right,
                  "This is the gradient of the batch-mean cross-entropy with respect to the "
                  "logits, (p − y)/N. "
                  + ("It is right." if mean_is_right else
                     "You asked for the summed loss, whose gradient has no 1/N."), fix),
        Candidate("the summed cross-entropy gradient p − y, without 1/N",
                  lambda c: grad(c, "sum"), not mean_is_right,
                  "This is p − y, the gradient of the summed loss. "
                  + ("It is right for --reduction sum." if not mean_is_right else
                     "If your loss is the mean over the batch (the usual choice, and "
                     "softgrad's default), its gradient is (p − y)/N: without the 1/N "
                     "every step is N times too large and depends on the batch size."), fix),
        Candidate("minus the gradient, (y − p)/N", lambda c: -grad(c, "mean"), False,
                  "This is minus the gradient: gradient descent with it climbs the loss. "
                  "The gradient is (p − y)/N.", fix),
        Candidate("minus the summed gradient, y − p", lambda c: -grad(c, "sum"), False,
                  "This is minus the summed loss's gradient: gradient descent with it climbs "
                  "the loss. The gradient is (p − y)/N for a mean loss.", fix),
        Candidate("softmax itself, p (−y forgotten)", lambda c: sg.softmax(c.x), False,
                  "This is the softmax p itself; the gradient is (p − y)/N.", fix),
    ]
