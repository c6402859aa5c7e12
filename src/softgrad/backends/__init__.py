"""Pick the backend from the arguments' types.

TensorFlow is never imported here: if it is not already in ``sys.modules``
no argument can be a TensorFlow tensor, so NumPy is the answer.
"""

import sys

from .numpy import NUMPY
from ._base import Backend

__all__ = ["Backend", "backend_for", "NUMPY"]


def _is_tensorflow(value) -> bool:
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    return isinstance(value, (tf.Tensor, tf.Variable))


def backend_for(*values) -> Backend:
    """The backend of the first framework argument; NumPy when there is none."""
    if any(_is_tensorflow(v) for v in values):
        from .tensorflow import TENSORFLOW

        return TENSORFLOW
    return NUMPY
