"""Mistake: only the Jacobian's diagonal, s(1 − s), as for a sigmoid.

The sigmoid's derivative is elementwise, so this backward pass treats softmax
the same way. It drops the off-diagonal terms −s_i·s_j: raising one logit
lowers every other probability. The right backward is s ⊙ (dy − ⟨dy, s⟩).
"""

import numpy as np


def softmax_backward(x, dy):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    s = e / e.sum(axis=-1, keepdims=True)
    return dy * s * (1 - s)
