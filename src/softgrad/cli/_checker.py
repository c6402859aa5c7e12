"""Run a user's derivative on test inputs and name the quantity it computes."""

import math
import time
from dataclasses import dataclass, field

import numpy as np

from softgrad.cli._candidates import Case
from softgrad.cli._usercode import UserCodeError, as_array, call
from softgrad.cli._util import import_tensorflow

# Rows of the large-logit case sit near these offsets: far enough apart that
# exp overflows (no max shift) or underflows (one global max) in float32 and
# float64 alike, which is how those two mistakes show themselves.
_LARGE_OFFSETS = (0.0, 1000.0, -1000.0)


@dataclass
class Comparison:
    """How far the user's results are from one candidate on the ordinary inputs."""

    name: str
    error: float  # max |yours − candidate|; inf when it cannot be measured
    tolerance: float
    shape: str  # the candidate's shape in symbols, e.g. "N×C×C"
    problem: str = ""  # why no error could be measured

    @property
    def matches(self):
        return self.error <= self.tolerance


@dataclass
class Report:
    kind: str
    framework: str
    dtype: str
    inputs: list
    comparisons: list
    verdict: str = "wrong"  # or "correct"
    headline: str = ""
    why: str = ""
    fix: str = ""
    notes: list = field(default_factory=list)

    @property
    def exit_code(self):
        return 0 if self.verdict == "correct" else 1


class Runner:
    """Calls the user's function on a Case, in the user's framework and dtype."""

    def __init__(self, function, path, *, kind, framework, dtype, labels="index"):
        self.function, self.path = function, path
        self.kind, self.dtype, self.labels = kind, np.dtype(dtype), labels
        self.tf = import_tensorflow() if framework == "tensorflow" else None

    def __call__(self, case):
        try:
            value = call(self.function, self._arguments(case), self.path)
        except UserCodeError as err:
            raise UserCodeError(f"{self.function.__name__} raised on {case.title}:\n{err}") from None
        return _as_result(value, case.x.shape)

    def _arguments(self, case):
        if self.kind == "logits":
            return (self._array(case.x),)
        if self.kind == "upstream":
            return self._array(case.x), self._array(case.dy)
        if self.labels == "onehot":
            return self._array(case.x), self._array(np.eye(case.x.shape[-1])[case.labels])
        return self._array(case.x), self._array(case.labels, integer=True)

    def _array(self, value, integer=False):
        # Always a copy: a function that works in place must not alter the case.
        value = value.copy() if integer else value.astype(self.dtype)
        return self.tf.constant(value) if self.tf else value


def _as_result(value, logits_shape):
    # A (loss, gradient) pair is common for cross-entropy: judge the gradient.
    if isinstance(value, (tuple, list)) and len(value) == 2:
        for part in value:
            array = as_array(part)
            if array is not None and array.shape == logits_shape:
                return array
    return as_array(value)


def make_cases(dtype, seed=0):
    """Ordinary inputs (one row, two batches) and one batch of large logits."""
    rng = np.random.default_rng(seed)

    def case(title, n, c, offsets=None):
        x = rng.normal(0.0, 2.0, (n, c))
        if offsets is not None:
            x = x + np.asarray(offsets)[:, None]
        # Round to the user's dtype once, so both sides see the same numbers.
        x = x.astype(dtype).astype(np.float64)
        dy = rng.normal(size=(n, c)).astype(dtype).astype(np.float64)
        return Case(f"{title} {n}×{c}", x, dy, rng.integers(0, c, n))

    return [case("one row", 1, 5), case("a batch", 8, 5), case("a batch", 3, 7),
            case("large logits", 3, 6, _LARGE_OFFSETS)]


def tolerance(reference, result, input_dtype):
    """16·(C + 2)·ε·max(1, max|reference|).

    Each entry of these derivatives is a sum of at most C + 1 rounded products
    of terms bounded by max(1, max|value|), after an exp and a division that
    each add a few ulp; the summation bound γ_n ≈ n·ε gives (C + 2)·ε, and 16
    covers the few-ulp functions with room for a different summation order.
    ε is that of the less precise of the input and the result.
    """
    dtypes = [np.dtype(input_dtype)] + ([result.dtype] if result.dtype.kind == "f" else [])
    eps = max(np.finfo(d).eps for d in dtypes)
    scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
    return 16 * (reference.shape[-1] + 2) * eps * scale


def compare(results, cases, candidate, input_dtype):
    """The worst error, over the cases, of the user's results against a candidate."""
    worst = Comparison(candidate.name, 0.0, math.inf, "")
    for result, case in zip(results, cases):
        reference = candidate.compute(case)
        shape = _symbols(reference, case)
        if result is None or result.shape != reference.shape:
            return Comparison(candidate.name, math.inf, 0.0, shape, "shape differs")
        difference = np.abs(result.astype(np.float64) - reference)
        if not np.isfinite(difference).all():
            return Comparison(candidate.name, math.inf, 0.0, shape, "yours has NaN/inf")
        worst = Comparison(candidate.name, max(worst.error, float(difference.max(initial=0.0))),
                           min(worst.tolerance, tolerance(reference, result, input_dtype)), shape)
    return worst


def _symbols(reference, case):
    n, c = case.x.shape
    names = {n: "N", c: "C"}
    return "×".join(names.get(d, str(d)) for d in reference.shape)


def timing(runner, candidate, dtype, seed=0):
    """(yours, softgrad's) seconds on a 64×32 batch, best of three."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, (64, 32)).astype(dtype).astype(np.float64)
    case = Case("timing 64×32", x, rng.normal(size=x.shape), rng.integers(0, 32, 64))
    return _best_of(lambda: runner(case)), _best_of(lambda: candidate.compute(case))


def _best_of(thunk, runs=3):
    thunk()  # warm-up: compiling kernels or tracing graphs is not what we compare
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        thunk()
        best = min(best, time.perf_counter() - start)
        if best > 1.0:  # a slow function has made its point after one run
            break
    return best
