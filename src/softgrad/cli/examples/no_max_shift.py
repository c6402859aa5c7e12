"""Mistake: softmax without the max shift.

The backward formula s ⊙ (dy − ⟨dy, s⟩) is right, but the softmax inside
exponentiates the raw logits: exp overflows to inf for logits above about 709
in float64, and the row becomes inf/inf = NaN.
"""

import numpy as np


def softmax_backward(x, dy):
    e = np.exp(x)
    s = e / e.sum(axis=-1, keepdims=True)
    return s * (dy - (dy * s).sum(axis=-1, keepdims=True))
