"""Mistake: one max over the whole batch instead of each row's max.

``x - x.max()`` protects the row that holds the batch's largest logit, but a
row whose logits all sit far below it underflows to exp(−1000) = 0 in every
entry and becomes 0/0 = NaN. The shift must be per row:
``x.max(axis=-1, keepdims=True)``.
"""

import numpy as np


def softmax_backward(x, dy):
    e = np.exp(x - x.max())
    s = e / e.sum(axis=-1, keepdims=True)
    return s * (dy - (dy * s).sum(axis=-1, keepdims=True))
