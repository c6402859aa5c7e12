"""The per-chunk maths of the linear cross-entropy, written once.

Both drivers (NumPy in ``linear_cross_entropy.py``, TensorFlow in
``backends/tensorflow_linear_ce.py``) loop over column chunks of the weight
and call these functions on a namespace ``xp`` that provides ``exp``,
``log1p``, ``expm1``, ``tanh``, ``abs``, ``where``, ``maximum``, ``zeros_like``,
``cast_like``,
``rowmax``/``rowsum`` (reducing the last axis away), ``take_at`` and
``put_at`` (one entry per row, at a column that may lie outside the chunk).
Rows are examples, columns are classes; per-row values have shape (N,).
The derivations are in docs/derivations.md#linear-cross-entropy.
"""

import math

NEG_INF = -math.inf


def capped(xp, u, softcap):
    """``(x, u / s)``: the soft-capped logits x = s tanh(u / s) (Gemma 2)."""
    if softcap is None:
        return u, None
    a = u / softcap
    return softcap * xp.tanh(a), a


def chunk_rest(xp, x):
    """``(m_k, r_k)`` with ``log sum exp(x) = m_k + log1p(r_k)`` over the chunk.

    r_k sums the entries below the chunk's max and counts its extra ties, the
    log1p form of docs/derivations.md#softmax.
    """
    m = xp.rowmax(x)
    z = x - m[:, None]
    top = z == 0
    below = xp.rowsum(xp.where(top, xp.zeros_like(z), xp.exp(z)))
    return m, below + (xp.rowsum(xp.cast_like(top, x)) - 1.0)


def merge(xp, m, r, m_k, r_k):
    """Online log-sum-exp: fold a chunk's ``(m_k, r_k)`` into the running ``(m, r)``.

    Both sums are rescaled to the larger shift, keeping the largest term
    exactly 1 outside r. A chunk whose row has no finite logit leaves that
    row alone, so exp(-inf - (-inf)) is never taken; NaN and +inf reach r
    and poison only their row.
    """
    ahead = m_k > m
    r_new = xp.where(
        ahead,
        (r + 1.0) * xp.exp(m - m_k) + r_k,
        r + (r_k + 1.0) * xp.exp(m_k - m),
    )
    r_new = xp.where(m_k == NEG_INF, r, r_new)
    return xp.maximum(m, m_k), r_new


def row_loss(xp, m, r, x_t, sum_x, n_classes, label_smoothing, z_loss):
    """Per-example loss from the finished row statistics.

    l = log1p(r) - <q, x - m> + z_loss lse^2, with q = (1 - eps) e_t + eps / V
    summing to 1, so <q, x - m> = (1 - eps)(x_t - m) + eps (mean(x) - m)
    (docs/derivations.md#linear-cross-entropy). Returns ``(loss, log1p(r))``.
    """
    log_z = xp.log1p(r)
    picked = x_t - m
    if label_smoothing:
        eps = label_smoothing
        picked = (1.0 - eps) * picked + eps * (sum_x / n_classes - m)
    loss = log_z - picked
    if z_loss:
        lse = m + log_z
        loss = loss + z_loss * lse * lse
    return loss, log_z


def chunk_grad(xp, x, m, log_z, local_t, in_chunk, coef, n_classes, label_smoothing, z_loss):
    """The chunk of d loss / d logits: coef * (p - q + 2 z_loss lse p).

    p = exp((x - m) - log1p(r)) keeps the log1p precision. At the label the
    term p_t - 1 is formed as expm1(log p_t), without cancellation, since the
    rest of the row is in other chunks (docs/derivations.md#precision).
    ``coef`` holds, per row, the reduction's scale times the upstream
    gradient, and 0 for ignored examples.
    """
    eps = label_smoothing
    logp = (x - m[:, None]) - log_z[:, None]
    p = xp.exp(logp)
    lse = m + log_z
    grow = 1.0 + (2.0 * z_loss) * lse if z_loss else None
    g = p if grow is None else p * grow[:, None]
    if eps:
        g = g - eps / n_classes
    logp_t = xp.take_at(logp, local_t, in_chunk)
    g_t = xp.expm1(logp_t) + eps * (1.0 - 1.0 / n_classes)
    if z_loss:
        g_t = g_t + (2.0 * z_loss) * lse * xp.exp(logp_t)
    g = xp.put_at(g, local_t, in_chunk, g_t)
    return g * coef[:, None]


def uncapped_grad(xp, g, a):
    """Chain through the soft-cap: d/du s tanh(u / s) = sech^2(a), a = u / s.

    Written as 4 e / (1 + e)^2 with e = exp(-2|a|) rather than 1 - tanh(a)^2,
    which cancels where tanh saturates (a relative error of u / sech^2(a):
    300 ulp already at a = 3.5) and cannot overflow.
    """
    if a is None:
        return g
    e = xp.exp(-2.0 * xp.abs(a))
    return g * (4.0 * e / ((1.0 + e) * (1.0 + e)))
