"""Loading and calling a user's function without letting it crash the checker."""

import importlib.util
import inspect
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from softgrad.cli._util import CliError

_LABEL_WORDS = ("label", "target", "onehot", "one_hot", "truth", "class")
_LABEL_NAMES = {"y", "t", "y_true", "ytrue", "yb"}
_UPSTREAM_WORDS = ("grad", "upstream", "cotangent", "delta", "dout", "d_out", "dvalues")


class UserCodeError(CliError):
    """The user's code raised; the message is its short traceback."""


def load_function(spec):
    """Import ``FILE.py:FUNCTION`` and return ``(function, module, path)``."""
    file_part, colon, name = spec.rpartition(":")
    if not colon or not file_part or not name:
        raise CliError(f"expected FILE.py:FUNCTION, got {spec!r}")
    path = Path(file_part).resolve()
    if not path.is_file():
        raise CliError(f"no such file: {file_part}")
    module = _import_file(path)
    function = getattr(module, name, None)
    if function is None:
        defined = ", ".join(n for n, v in vars(module).items()
                            if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise CliError(f"{file_part} has no function {name!r} (it defines: {defined or 'none'})")
    if not callable(function):
        raise CliError(f"{file_part}:{name} is not a function (it is a {type(function).__name__!r})")
    return function, module, path


def _import_file(path):
    # A unique module name keeps two checked files with the same name apart.
    spec = importlib.util.spec_from_file_location(f"_softgrad_user_{abs(hash(path))}", path)
    if spec is None:
        raise CliError(f"{path.name} is not a Python file (expected FILE.py:FUNCTION)")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # SystemExit too: the file is not ours to obey
        if isinstance(err, KeyboardInterrupt):
            raise
        raise UserCodeError(f"importing {path.name} raised:\n{short_traceback(err, path)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def short_traceback(err, path):
    """A traceback of the user's own frames and the frame where the error surfaced."""
    frames = traceback.extract_tb(err.__traceback__)
    shown = [f for f in frames if Path(f.filename) == path]
    if frames and frames[-1] not in shown:
        shown.append(frames[-1])  # where, inside a library, the error surfaced
    lines = traceback.format_list(shown)
    lines += traceback.format_exception_only(type(err), err)
    return "".join(["Traceback (most recent call last):\n", *lines]).rstrip()


def call(function, args, path):
    """Call the user's function; its warnings are muted, its exceptions reported."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return function(*args)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit too: the checker must report, not stop
            raise UserCodeError(short_traceback(err, path)) from None


def as_array(value):
    """The user's result as a NumPy array, or None when it is not numeric."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        array = np.asarray(value)
    except Exception:  # a ragged or exotic return value is simply "not an array"
        return None
    return array if array.dtype.kind in "fiu" else None


def infer_kind(function, name):
    """'logits', 'upstream' or 'labels', from the function's required parameters."""
    params = _required_positional(function)
    if len(params) == 1:
        return "logits"
    if len(params) == 2:
        kind = _second_parameter_kind(params[1])
        if kind:
            return kind
        raise CliError(
            f"cannot tell from the parameter name {params[1]!r} whether {name} takes "
            "labels or an upstream gradient; pass --kind labels or --kind upstream"
        )
    raise CliError(
        f"{name} takes {len(params)} required arguments; expected 1 (logits) or 2 "
        "(logits and an upstream gradient, or logits and labels)"
    )


def _required_positional(function):
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise CliError("cannot read the function's signature; pass --kind") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values()
            if p.kind in positional and p.default is inspect.Parameter.empty]


def _second_parameter_kind(name):
    lowered = name.lower()
    if lowered in _LABEL_NAMES or any(w in lowered for w in _LABEL_WORDS):
        return "labels"
    # dy, ds, dL_ds, dout: the d-prefix convention for an incoming gradient
    if any(w in lowered for w in _UPSTREAM_WORDS) or (lowered.startswith("d") and len(lowered) <= 6):
        return "upstream"
    return None


def infer_framework(module):
    """'tensorflow' when the user's module uses TensorFlow, else 'numpy'."""
    for value in vars(module).values():
        attribute = "__name__" if inspect.ismodule(value) else "__module__"
        owner = getattr(value, attribute, None)
        if isinstance(owner, str) and owner.split(".")[0] in ("tensorflow", "keras"):
            return "tensorflow"
    return "numpy"
