"""What every backend provides: primitives on the last axis, plus the ops.

The op methods (``softmax``, ``cross_entropy``, ...) run the generic maths of
``softgrad._maths`` on the backend itself as the namespace. A backend may
override one with a faster path that computes the same thing.
"""

from .. import _maths


class Backend:
    name = "abstract"

    # -- the softmax family ----------------------------------------------

    def softmax(self, x, temperature, mask):
        return _maths.softmax(self, x, temperature, mask)

    def log_softmax(self, x, temperature, mask):
        return _maths.log_softmax(self, x, temperature, mask)

    def softmax_jacobian(self, x, temperature, mask):
        y = self.softmax(x, temperature, mask)
        return _maths.softmax_jacobian(self, y, temperature)

    def log_softmax_jacobian(self, x, temperature, mask):
        logp = self.log_softmax(x, temperature, mask)
        return _maths.log_softmax_jacobian(self, logp, temperature)

    def softmax_vjp(self, y, dy):
        return _maths.softmax_vjp(self, y, dy)

    def log_softmax_vjp(self, logp, dlogp):
        return _maths.log_softmax_vjp(self, logp, dlogp)

    def log_softmax_jvp(self, logp, dx):
        return _maths.log_softmax_jvp(self, logp, dx)

    # -- cross-entropy -----------------------------------------------------

    def cross_entropy(self, x, tg, *, z_loss, reduction):
        loss = _maths.cross_entropy_parts(self, x, tg, z_loss)[0]
        return _maths.reduce_loss(self, loss, tg, reduction)

    def cross_entropy_with_grad(self, x, tg, *, z_loss, reduction):
        loss, z, m, lse = _maths.cross_entropy_parts(self, x, tg, z_loss)
        grad = _maths.cross_entropy_grad(self, z, m, lse, tg, z_loss, reduction)
        return _maths.reduce_loss(self, loss, tg, reduction), grad

    def cross_entropy_hvp(self, x, tg, v, *, z_loss, reduction):
        return _maths.cross_entropy_hvp(self, x, tg, v, z_loss, reduction)

    # -- primitives composed of the backend's own -------------------------

    def rowsum_except(self, a, index):
        """Each row's sum without its entry at a per-row index, (..., 1)."""
        return self.rowsum(self.put_at(a, index, 0.0))

    # -- the cores, which a backend may wrap with custom gradients ----------

    def softmax_core(self, z):
        return _maths.softmax_body(self, z)

    def log_softmax_core(self, z):
        return _maths.log_softmax_body(self, z)

    def logsumexp_core(self, z):
        return _maths.logsumexp_body(self, z)

    def xent_core(self, z, q):
        """``(loss, lse)`` per row of shifted logits."""
        return _maths.xent_body(self, z, q)
