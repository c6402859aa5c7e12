"""softgrad: softmax, log-softmax and all their derivatives.

Stable, fast and precise, on NumPy arrays and TensorFlow tensors, with one
API. Importing softgrad imports no framework; TensorFlow is used only when
TensorFlow tensors are passed in.
"""

from ._errors import SoftgradError
from .cross_entropy import cross_entropy, cross_entropy_hvp, cross_entropy_with_grad
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_with_grad
from .softmax import (
    log_softmax,
    log_softmax_jacobian,
    log_softmax_jvp,
    log_softmax_vjp,
    softmax,
    softmax_jacobian,
    softmax_jvp,
    softmax_vjp,
)

__version__ = "0.1.0"

__all__ = [
    "SoftgradError",
    "softmax",
    "log_softmax",
    "softmax_jacobian",
    "log_softmax_jacobian",
    "softmax_vjp",
    "softmax_jvp",
    "log_softmax_vjp",
    "log_softmax_jvp",
    "cross_entropy",
    "cross_entropy_with_grad",
    "cross_entropy_hvp",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
]
