"""Bring arguments into the layout the backends compute in, and back.

The backends work on the last axis in a float32-or-wider dtype. ``Logits``
remembers where the class axis was and which dtype to return.
"""

from . import _validate
from ._errors import SoftgradError
from .backends import backend_for


class Logits:
    """Validated logits with the class axis moved last."""

    def __init__(self, x, axis, *others, name="x"):
        self.xp = xp = backend_for(x, *others)
        value, self.dtype = _validate.floats(xp, x, name)
        _validate.ndim_at_least_1(xp, value, name)
        self.ndim = len(xp.shape(value))
        self.axis = _validate.axis(axis, self.ndim)
        self.original = value
        self.value = self.to_last(value)

    def to_last(self, a):
        """Move the class axis of an array shaped like the logits to the end."""
        return a if a is None or self.axis == self.ndim - 1 else self.xp.moveaxis(a, self.axis, -1)

    def from_last(self, a):
        """Undo :meth:`to_last` and round to the caller's dtype."""
        if self.axis != self.ndim - 1:
            a = self.xp.moveaxis(a, -1, self.axis)
        return self.rounded(a)

    def rounded(self, a):
        if self.xp.dtype_name(a) == self.dtype:
            return a
        # Finite results stay finite in float16/bfloat16 too: a value beyond
        # their range saturates instead of rounding to inf.
        return self.xp.cast(self.xp.saturate_to(a, self.dtype), self.dtype)

    def options(self, temperature, where):
        """Temperature and mask in the last-axis layout."""
        xp = self.xp
        t = _validate.temperature(xp, temperature, self.original, self.axis)
        m = _validate.mask(xp, where, self.original)
        return (t if isinstance(t, float) else self.to_last(t)), self.to_last(m)


def cotangent(logits: Logits, value, name):
    """A second array shaped like the first, e.g. dy or v."""
    xp = logits.xp
    a, _ = _validate.floats(xp, value, name)
    if xp.shape(a) != xp.shape(logits.original) and None not in xp.shape(a) + xp.shape(logits.original):
        raise SoftgradError(
            f"{name} must have the same shape as the first argument {xp.shape(logits.original)}, got {xp.shape(a)}"
        )
    return logits.to_last(xp.cast_to(a, logits.value.dtype))
