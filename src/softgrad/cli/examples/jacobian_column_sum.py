"""Mistake: the softmax Jacobian summed over an axis.

The function builds the batched Jacobian J = diag(s) − s sᵀ correctly, then
returns ``J.sum(axis=1)`` as "the derivative". Every column of J sums to zero,
so this returns zeros for any logits and training silently stalls. Backprop
needs Jᵀ·dy, which takes the upstream gradient dy as a second argument.
"""

import numpy as np


def softmax_derivative(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    s = e / e.sum(axis=1, keepdims=True)
    jacobian = np.einsum("ni,ij->nij", s, np.eye(z.shape[1])) - np.einsum("ni,nj->nij", s, s)
    return jacobian.sum(axis=1)
