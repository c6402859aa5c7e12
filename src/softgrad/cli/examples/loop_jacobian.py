"""Correct but slow: the softmax Jacobian built entry by entry in Python loops.

Every entry ∂s_i/∂x_j = s_i(δ_ij − s_j) is right, but three nested Python
loops make N·C² interpreter steps, and backprop never needs the C×C matrix:
softgrad.softmax_vjp gives Jᵀ·dy in O(N·C).
"""

import numpy as np


def softmax_jacobian(x):
    n, c = x.shape
    jacobian = np.zeros((n, c, c))
    for row in range(n):
        e = np.exp(x[row] - max(x[row]))
        s = e / sum(e)
        for i in range(c):
            for j in range(c):
                jacobian[row, i, j] = s[i] * ((1.0 if i == j else 0.0) - s[j])
    return jacobian
