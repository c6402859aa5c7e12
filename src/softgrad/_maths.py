"""The maths of softgrad, written once.

Every function takes the backend namespace ``xp`` first and works on the
**last axis** (the public layer moves the class axis there). ``xp`` supplies
elementwise and row-wise primitives (``rowsum`` and ``rowmax`` keep the
reduced axis) plus the "core" operations that a backend may wrap with
custom gradients, all on already shifted logits: ``softmax_core``,
``log_softmax_core``, ``logsumexp_core`` and ``xent_core``.

Each formula carries a pointer to its derivation in docs/derivations.md.
"""

import functools
import math

NEG_INF = -math.inf


# -- forward ---------------------------------------------------------------


def shifted_logits(xp, x, temperature=1.0, mask=None):
    """Return ``(z, m)`` with ``z = (x - m) / T`` and absent entries at -inf.

    An entry is absent when it is masked out or its logit is -inf. ``m`` is
    the row max over present entries (0 for a row with none), and carries no
    gradient: softmax is invariant to a per-row shift, so its derivative
    through ``m`` is exactly zero (derivations.md#softmax). Shifting before
    dividing keeps ``x / T`` from overflowing.
    """
    if mask is None and isinstance(temperature, float):
        return shifted_by_max(xp, x, xp.rowmax(x), temperature)
    present = x != NEG_INF
    if mask is not None:
        present = xp.logical_and(present, mask)
    m = _zero_if_empty(xp, xp.rowmax(xp.where(present, x, NEG_INF)))
    # Absent entries are replaced by m before the arithmetic so that
    # neither their value nor their gradient can produce inf - inf or
    # 0 * inf.
    z = _divided(xp.where(present, x, m), m, temperature)
    return _saturated(xp, z, present), m


def shifted_by_max(xp, x, row_max, temperature=1.0):
    """:func:`shifted_logits` with no mask and a float temperature, given
    ``row_max``, the max of each row of x found by the caller (with its
    argmax, say)."""
    # Nothing multiplies a -inf logit in the backward pass here, so the
    # logits need no masking before the arithmetic.
    m = _zero_if_empty(xp, row_max)
    z = x - m if temperature == 1.0 else _divided(x, m, temperature)
    return _saturated(xp, z, x != NEG_INF), m


def shifted_by(xp, x, m):
    """z of :func:`shifted_logits` (no mask, T = 1) for the shift ``m`` it
    returned, here for entries picked from x or for x again."""
    return _saturated(xp, x - m, x != NEG_INF)


def exp_argument(xp, x, m, temperature=1.0):
    """(x - m) / T as :func:`shifted_logits` forms it (no mask), before
    absent entries are set to -inf and overflowing ones saturated. Its exp
    is exp(z) entry by entry (such entries give 0 either way), so a row's sum
    of exponentials can be formed from x, without z kept in memory for
    another use."""
    return x - m if temperature == 1.0 else _divided(x, m, temperature)


def _saturated(xp, z, present):
    # A present entry whose shifted logit overflows (x = -max next to
    # x = max) saturates at the most negative float instead of becoming
    # -inf, which would mean absent: finite logits give finite results.
    return xp.where(present, xp.saturate(z), NEG_INF)


def _divided(x, m, temperature):
    """(x - m) / T, with x - m halved first (exactly): when T > 1 brings a
    difference beyond the float range back into it (x = -max next to
    x = max), the result is right instead of saturated; the final doubling
    overflows only where the true result does."""
    return ((0.5 * x - 0.5 * m) / temperature) * 2.0


def _zero_if_empty(xp, m):
    return xp.stop_gradient(xp.where(m == NEG_INF, xp.zeros_like(m), m))


def logsumexp_body(xp, z):
    """log Σ exp(z) for shifted logits (max 0), in the log1p form.

    Σ e^z = 1 + rest, where rest sums the entries below the max and counts
    the extra ties; log1p(rest) keeps a confident row's loss to full relative
    precision instead of rounding 1 + 1e-17 to 1 (derivations.md#softmax).
    A row with no present entry gives -inf.
    """
    top = z == 0
    below = xp.rowsum(xp.where(top, xp.zeros_like(z), xp.exp(z)))
    rest = below + (xp.rowsum(xp.cast_like(top, z)) - 1)
    return xp.log1p(rest)


def logsumexp_anchored(xp, z, k):
    """log Σ exp(z) for shifted logits, anchored at an entry ``k`` (..., 1).

    Σ e^z = 1 + Σ_c (e^{z_c} - [c = k]) for any k, so the log1p form of
    :func:`logsumexp_body` holds with that sum as ``rest``. Where z_k = 0 (k
    is at the row max) the anchor's term is exactly 0 and ``rest`` is the
    same sum of the other entries, ties included, as there: full relative
    precision, from one pass over the row and no count of the ties. Elsewhere
    ``rest`` holds the max's 1 and has the absolute precision of that sum
    (derivations.md#softmax). A row with no entry gives -inf (rest = -1); a
    NaN gives NaN wherever it is, the anchor included.
    """
    # The 1 comes off the anchor's term alone rather than through a one-hot
    # row, which would cost a comparison per entry.
    return xp.log1p(xp.rowsum(xp.add_at(xp.exp(z), k, -1.0)))


def log_softmax_anchored(xp, x, z, m, top, temperature=1.0):
    """:func:`log_softmax_body` for ``z, m = shifted_logits(xp, x, T)`` (no
    mask), given each row's argmax ``top``: the log-sum-exp is anchored
    there, where z = 0, so it is the same sum, ties included, in one pass
    (:func:`logsumexp_anchored`)."""
    lse = logsumexp_anchored(xp, exp_argument(xp, x, m, temperature), top)
    return z - _finite_or_zero(xp, lse)


def softmax_body(xp, z):
    """softmax of shifted logits; a row with no present entry gives 0."""
    e = xp.exp(z)
    s = xp.rowsum(e)
    return e / xp.where(s == 0, xp.ones_like(s), s)


def softmax_unmasked(xp, x, temperature=1.0, row_max=None):
    """softmax of x / T, no mask: :func:`softmax_body` of the exponentials
    of :func:`exp_argument`, which are those of z. So no pass forms z, its
    -inf entries or its saturation, which only its log-space uses need.
    ``row_max``: the max of each row of x, where the caller found it."""
    m = _zero_if_empty(xp, xp.rowmax(x) if row_max is None else row_max)
    return softmax_body(xp, exp_argument(xp, x, m, temperature))


def log_softmax_body(xp, z):
    """log-softmax of shifted logits; a row with no present entry gives -inf."""
    lse = logsumexp_body(xp, z)
    return z - xp.where(lse == NEG_INF, xp.zeros_like(lse), lse)


# -- first derivatives (derivations.md#vjp-and-jvp, #precision) -------------


def softmax_vjp(xp, y, dy, top=None):
    """dx = y * (dy - sum(dy * y)), i.e. J^T dy = J dy.

    ``top`` is the index of each row's largest probability, shape (..., 1),
    when the caller already knows it.
    """
    top = xp.argmax_index(y) if top is None else top
    # Any constant may be subtracted from dy (sum(y) = 1); subtracting dy at
    # the argmax makes the weighted sum small, so tiny components keep their
    # relative precision next to a probability of one (derivations.md#precision).
    d = dy - xp.take(dy, top)
    return y * (d - xp.rowsum(d * y))


def log_softmax_vjp(xp, logp, dlogp, top=None, all_present=False):
    """dx = dlogp - p * sum(dlogp); absent entries (logp = -inf) get 0.

    At the argmax r, dlogp_r - p_r T is evaluated as
    -sum_{c != r} dlogp_c - T expm1(logp_r), which has no cancellation when
    p_r is close to one, and makes each row sum to zero
    (derivations.md#precision). ``all_present``: the caller knows that no
    entry is absent, so the sums need not read logp to leave them out.
    """
    top = xp.argmax_index(logp) if top is None else top
    present = logp != NEG_INF
    counted = dlogp if all_present else xp.where(present, dlogp, xp.zeros_like(dlogp))
    # The argmax's entry is taken out of the sum, and its result put in, one
    # entry per row rather than through a one-hot row.
    others = xp.rowsum_except(counted, top)
    logp_top = xp.take(logp, top)
    total = others + xp.where(logp_top == NEG_INF, xp.zeros_like(logp_top), xp.take(dlogp, top))
    g = xp.where(present, dlogp - xp.exp(logp) * total, xp.zeros_like(dlogp))
    return xp.put_at(g, top, -others - total * xp.expm1(logp_top))


def log_softmax_jvp(xp, logp, dx):
    """J dx = dx - sum(p * dx); absent entries (logp = -inf) get 0."""
    present = logp != NEG_INF
    p = xp.exp(logp)
    d = xp.where(present, dx - xp.take(dx, xp.argmax_index(logp)), xp.zeros_like(dx))
    return xp.where(present, d - xp.rowsum(p * d), xp.zeros_like(dx))


# -- explicit Jacobians (derivations.md#jacobian) ---------------------------


def softmax_jacobian(xp, y, temperature=1.0):
    """J[..., i, j] = y_i (delta_ij - y_j) / T."""
    eye = xp.eye_like(y)
    return xp.expand_dims(y, -1) * (eye - xp.expand_dims(y, -2)) / _per_matrix(xp, temperature)


def log_softmax_jacobian(xp, logp, temperature=1.0):
    """J[..., i, j] = (delta_ij - p_j) / T for present i; 0 for absent rows i."""
    eye = xp.eye_like(logp)
    p = xp.exp(logp)
    present = xp.expand_dims(logp != NEG_INF, -1)
    jac = xp.where(present, eye - xp.expand_dims(p, -2), xp.zeros_like(eye * p[..., None]))
    return jac / _per_matrix(xp, temperature)


def _per_matrix(xp, temperature):
    """A per-row temperature of shape (..., 1) as (..., 1, 1)."""
    if isinstance(temperature, float):
        return temperature
    return xp.expand_dims(temperature, -1)


# -- softmax family with temperature and masks ------------------------------


def softmax(xp, x, temperature=1.0, mask=None):
    z, _ = shifted_logits(xp, x, temperature, mask)
    return xp.softmax_core(z)


def log_softmax(xp, x, temperature=1.0, mask=None):
    z, _ = shifted_logits(xp, x, temperature, mask)
    return xp.log_softmax_core(z)


# -- cross-entropy (derivations.md#cross-entropy) ---------------------------


class Targets:
    """The per-example target weights q and what the reductions need.

    q = ((1 - eps) * Y + eps / C) * w, zero for ignored examples; S = sum(q);
    ``valid`` marks the examples that count; ``denominator`` is what "mean"
    divides by (derivations.md#cross-entropy). ``q`` and ``denominator`` are
    built on first use: a fused kernel works from the labels themselves
    (``labels``, ``weight``, ``ignore_index``, ``label_smoothing``) and never
    needs the dense (N, C) q.
    """

    def __init__(self, xp, labels, n_classes, dtype, *, soft, weight, ignore_index, label_smoothing):
        self._xp, self._n_classes, self._dtype = xp, n_classes, dtype
        self.labels, self.weight = labels, weight
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.soft = labels if soft else None
        if soft:
            self.valid = None
        elif ignore_index is None:
            self.valid = xp.ones_bool(labels)
        else:
            self.valid = labels != ignore_index

    @functools.cached_property
    def _y(self):
        """Y: the soft labels, or the one-hot labels with ignored rows zeroed."""
        if self.soft is not None:
            return self.soft
        xp = self._xp
        y = xp.one_hot(self.index[..., 0], self._n_classes, self._dtype)
        return y * xp.cast_like(xp.expand_dims(self.valid, -1), y)

    @functools.cached_property
    def q(self):
        xp, y, eps = self._xp, self._y, self.label_smoothing
        q = (1.0 - eps) * y if eps else y
        if eps:
            smooth = eps / self._n_classes
            valid = self.valid
            q = q + (smooth if valid is None else smooth * xp.cast_like(xp.expand_dims(valid, -1), y))
        return q if self.weight is None else q * self.weight

    @functools.cached_property
    def denominator(self):
        xp = self._xp
        if self.soft is not None:
            return xp.count_rows(self.soft)
        return xp.total(self.label_weight)

    @functools.cached_property
    def index(self):
        """Integer labels as an index into the class axis, shape (..., 1);
        ignored examples, whose label may lie outside it, point at class 0."""
        xp = self._xp
        labels = self.labels if self.ignore_index is None else xp.where(self.valid, self.labels, 0)
        return xp.expand_dims(xp.cast(labels, "int32"), -1)

    @functools.cached_property
    def label_weight(self):
        """w[label] for the examples that count, 0 for the others (integer labels)."""
        xp = self._xp
        valid = xp.cast_to(self.valid, self._dtype)
        return valid if self.weight is None else valid * xp.lookup(self.weight, self.index[..., 0])

    @functools.cached_property
    def total(self):
        """S = sum_c q_c per example, shape (..., 1).

        For integer labels, from the label's weight instead of a sum over the
        dense q: S = valid * ((1 - eps) w[label] + eps / C * sum(w)).
        """
        xp = self._xp
        if self.soft is not None:
            return xp.rowsum(self.q)
        eps, s = self.label_smoothing, self.label_weight
        if eps:
            spread = 1.0 if self.weight is None else xp.total(self.weight) / self._n_classes
            s = (1.0 - eps) * s + (eps * spread) * xp.cast_to(self.valid, self._dtype)
        return xp.expand_dims(s, -1)

    @functools.cached_property
    def smoothing_share(self):
        """The part of q that label smoothing spreads over the row,
        valid * eps / C * w (broadcastable to the logits), or 0."""
        xp, eps = self._xp, self.label_smoothing
        if not eps:
            return 0.0
        share = (eps / self._n_classes) * xp.expand_dims(xp.cast_to(self.valid, self._dtype), -1)
        return share if self.weight is None else share * self.weight

    @functools.cached_property
    def label_q(self):
        """q at the label, shape (..., 1) (integer labels)."""
        q = self._xp.expand_dims(self.label_weight, -1)
        eps = self.label_smoothing
        return ((1.0 - eps) + eps / self._n_classes) * q if eps else q

    def label_dot(self, at_label, z):
        """sum_c q_c z_c per example, shape (..., 1), with 0 * -inf = 0, for
        integer labels: the label's entry of z (``at_label``) times its
        weight, plus the smoothing's share of the row."""
        xp = self._xp
        a = xp.expand_dims(self.label_weight, -1)
        eps = self.label_smoothing
        if eps:
            a = (1.0 - eps) * a
        dot = xp.where(a == 0, xp.zeros_like(a), a * at_label)
        if eps:
            w = 1.0 if self.weight is None else self.weight
            wz = z if self.weight is None else xp.where(w == 0, xp.zeros_like(z), w * z)
            valid = xp.expand_dims(self.valid, -1)
            dot = dot + xp.where(valid, (eps / self._n_classes) * xp.rowsum(wz), xp.zeros_like(dot))
        return dot


def targets(xp, labels, n_classes, dtype, *, soft, weight, ignore_index, label_smoothing):
    """Build :class:`Targets` from integer or soft labels."""
    return Targets(
        xp,
        labels,
        n_classes,
        dtype,
        soft=soft,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def _reduced(xp, value, tg, reduction):
    """``value`` (a loss, gradient or HVP) divided by the mean's denominator for "mean".

    Divided rather than multiplied by 1 / denominator: class weights may sum
    to a subnormal number whose reciprocal overflows. A mean over zero
    targets (all ignored, or all of weight 0) is 0 with zero gradient, not 0/0.
    """
    if reduction != "mean":
        return value
    d = xp.cast_to(tg.denominator, value.dtype)
    safe = xp.where(d == 0, xp.ones_like(d), d)
    return (value / safe) * xp.where(d == 0, xp.zeros_like(d), xp.ones_like(d))


def _valid_rows(xp, tg, like):
    return None if tg.valid is None else xp.cast_like(tg.valid, like)


def _finite_or_zero(xp, lse):
    """A row's log-sum-exp, with 0 for a row that has no entry (-inf)."""
    return xp.where(lse == NEG_INF, xp.zeros_like(lse), lse)


def xent_body(xp, z, q):
    """``(loss, lse)`` per row: -sum(q * log_softmax(z)) and logsumexp(z).

    The loss is S lse - sum(q z) with S = sum(q) and 0 * log 0 = 0; at the
    row max z = 0 exactly, so a confident correct row's loss is the tiny
    lse itself, to full relative precision.
    """
    lse = logsumexp_body(xp, z)
    qz = xp.rowsum(xp.where(q == 0, xp.zeros_like(q), q * z))
    loss = xp.rowsum(q) * _finite_or_zero(xp, lse) - qz
    return loss[..., 0], lse


def label_xent_body(xp, x, z, m, tg):
    """``(loss, lse)`` per row as :func:`xent_body`, for integer labels,
    without the dense q; ``z, m = shifted_logits(xp, x)``.

    The log-sum-exp is anchored at the label (:func:`logsumexp_anchored`):
    exact for any anchor, and at full relative precision when the label is at
    the row max, the one case where the loss is tiny. Otherwise p_label <= 1/2
    and the loss, at least S log 2, does not need it.

    The row's sum exponentiates :func:`exp_argument` rather than z, so that
    a compiler can form it from x instead of keeping z in memory for the
    gradient. The label's own z is formed from its logit alone.
    """
    lse = logsumexp_anchored(xp, exp_argument(xp, x, m), tg.index)
    at_label = shifted_by(xp, xp.take(x, tg.index), m)
    loss = tg.total * _finite_or_zero(xp, lse) - tg.label_dot(at_label, z)
    return loss[..., 0], lse


def xent_grad(xp, z, lse, q, total=None):
    """d xent / dz = S p - q with S = sum(q) (derivations.md#cross-entropy-gradient).

    At a row's max (z = 0), S p - q is evaluated as (S - q) + S (p - 1) with
    p - 1 = expm1(-lse): the naive p - 1 would round a 1e-17 gradient to 0
    (derivations.md#precision). Adding p - exp(-lse), which is 0 there, keeps
    the expression's own derivative that of S p - q. Absent entries
    (z = -inf) get 0. ``total`` is S when the caller has it.
    """
    total = xp.rowsum(q) if total is None else total
    lse = _finite_or_zero(xp, lse)
    p = xp.exp(z - lse)
    at_max = (total - q) + total * (xp.expm1(-lse) + (p - xp.exp(-lse)))
    g = xp.where(z == 0, at_max, total * p - q)
    return xp.where(z == NEG_INF, xp.zeros_like(g), g)


def by_label(xp, f, x, z, m, tg):
    """``f(z, q)`` over the row, for ``f`` elementwise in (z, q), for integer
    labels without the dense q; ``z, m = shifted_logits(xp, x)``.

    The row is formed with the smoothing's share of q only; the label's own
    entry, f at its own z with its whole q, is formed apart and put in place.
    Each entry is thus what f computes from the dense q, at the same
    precision, without a one-hot row.
    """
    at_label = shifted_by(xp, xp.take(x, tg.index), m)
    return xp.put_at(f(z, tg.smoothing_share), tg.index, f(at_label, tg.label_q))


def cross_entropy_parts(xp, x, tg, z_loss, by_label=False):
    """Per-example loss and the intermediates the gradient reuses.

    loss_n = -sum(q * logp) + z_loss * lse^2 (derivations.md#cross-entropy,
    #z-loss). Returns ``(loss, z, m, lse)``: the shifted logits, their shift
    and the log-sum-exp of z. ``by_label`` (integer labels) computes the
    loss from the labels, :func:`label_xent_body`, rather than through the
    backend's ``xent_core``.
    """
    z, m = shifted_logits(xp, x)
    loss, lse = label_xent_body(xp, x, z, m, tg) if by_label else xp.xent_core(z, tg.q)
    if z_loss:
        zterm = z_loss * xp.square(m + lse)[..., 0]
        valid = _valid_rows(xp, tg, zterm)
        loss = loss + (zterm if valid is None else zterm * valid)
    return loss, z, m, lse


def reduce_loss(xp, loss, tg, reduction):
    if reduction == "none":
        return loss
    total = xp.total(loss)
    return _reduced(xp, total, tg, reduction)


def cross_entropy_grad(xp, z, m, lse, tg, z_loss, reduction, q=None):
    """d loss / d logits = (S p - q) + 2 z_loss lse p, over the reduction's denominator.

    Elementwise in (z, q): ``q`` (default ``tg.q``) lets :func:`by_label`
    evaluate it without the dense q.
    """
    g = xent_grad(xp, z, lse, tg.q if q is None else q, tg.total)
    if z_loss:
        # A row with no entry has lse = -inf and p = 0: its gradient is 0, not -inf * 0.
        zg = (2.0 * z_loss) * _finite_or_zero(xp, m + lse) * xp.exp(z - _finite_or_zero(xp, lse))
        valid = _valid_rows(xp, tg, zg)
        g = g + (zg if valid is None else zg * xp.expand_dims(valid, -1))
    return _reduced(xp, g, tg, reduction)


def cross_entropy_hvp(xp, x, tg, v, z_loss, reduction):
    """H v = (S + 2 z_loss lse) p*(v - <p, v>) + 2 z_loss p <p, v> (#hessian)."""
    z, m = shifted_logits(xp, x)
    p = xp.softmax_core(z)
    lse = _finite_or_zero(xp, m + xp.logsumexp_core(z)) if z_loss else None
    hv = tg.total * softmax_vjp(xp, p, v)
    if z_loss:
        zhv = (2.0 * z_loss) * (lse * softmax_vjp(xp, p, v) + p * xp.rowsum(p * v))
        valid = _valid_rows(xp, tg, zhv)
        hv = hv + (zhv if valid is None else zhv * xp.expand_dims(valid, -1))
    return _reduced(xp, hv, tg, reduction)
