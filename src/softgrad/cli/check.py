"""``softgrad check FILE.py:FUNCTION``: what does this hand-written derivative compute?"""

import argparse
import textwrap

import numpy as np

from softgrad.cli._candidates import candidates
from softgrad.cli._checker import Report, Runner, compare, make_cases, timing, tolerance
from softgrad.cli._usercode import UserCodeError, infer_framework, infer_kind, load_function

_KINDS = {
    "logits": "f(x): logits only",
    "upstream": "f(x, dy): logits and an upstream gradient",
    "labels": "f(x, y): logits and labels",
}
_EPILOG = """\
The function's result is compared, on several random inputs including a batch
and a batch of large logits, with every quantity a softmax derivative might be:
the Jacobian and its transpose, its diagonal, its (zero) row and column sums,
the VJP and JVP, the log-softmax derivatives, the cross-entropy gradient with
and without 1/N, and what an unshifted softmax gives for large logits.

exit status: 0 correct, 1 wrong, 2 usage problem (missing file or function,
or the function raised).

examples:
  softgrad check my_layer.py:softmax_backward
  softgrad check my_layer.py:ce_grad --kind labels --reduction sum
  softgrad check tf_layer.py:softmax_grad --framework tensorflow --dtype float64
"""


def register(commands):
    parser = commands.add_parser(
        "check",
        help="check a hand-written softmax derivative",
        description=textwrap.fill("Import FUNCTION from FILE.py, run it on random logits, and say "
        "which softmax-related quantity it computes, whether that is what backprop "
        "needs, and which softgrad call does it right."),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="FILE.py:FUNCTION")
    parser.add_argument("--kind", choices=sorted(_KINDS),
                        help="what the function takes: logits; logits and an upstream "
                        "gradient; logits and labels (default: from its parameters)")
    parser.add_argument("--framework", choices=("numpy", "tensorflow"),
                        help="pass NumPy arrays or TensorFlow tensors "
                        "(default: tensorflow if the file uses it)")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="dtype of the inputs (default: float64 for numpy, "
                        "float32 for tensorflow)")
    parser.add_argument("--labels", choices=("auto", "index", "onehot"), default="auto",
                        help="labels as class indices or one-hot rows (default: whichever "
                        "the function accepts)")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                        help="the loss whose gradient a labels function computes "
                        "(default: %(default)s)")
    parser.set_defaults(run=run)


def run(args):
    function, module, path = load_function(args.target)
    report = check_function(function, module, path, kind=args.kind, framework=args.framework,
                            dtype=args.dtype, labels=args.labels, reduction=args.reduction)
    print(render(report, args.target))
    return report.exit_code


def check_function(function, module, path, *, kind=None, framework=None, dtype=None,
                   labels="auto", reduction="mean"):
    """Compare the function with every candidate and judge it; returns a Report."""
    kind = kind or infer_kind(function, function.__name__)
    framework = framework or infer_framework(module)
    dtype = dtype or ("float32" if framework == "tensorflow" else "float64")
    *ordinary, large = make_cases(dtype)

    def runner(encoding):
        return Runner(function, path, kind=kind, framework=framework, dtype=dtype, labels=encoding)

    if kind == "labels" and labels == "auto":
        labels = _label_encoding(runner, ordinary[1])
    run_one = runner(labels)
    results = [run_one(case) for case in ordinary]
    options = candidates(kind, reduction)
    comparisons = [compare(results, ordinary, c, dtype) for c in options]
    report = Report(kind, framework, dtype, [c.title for c in (*ordinary, large)], comparisons)
    matched = [c for c, cmp in zip(options, comparisons) if cmp.matches]
    if not matched:
        return _no_match(report, results[1], ordinary[1], comparisons)
    _judge(report, matched, run_one, large, dtype)
    return report


def _label_encoding(runner, case):
    """Index labels if the function accepts them, else one-hot rows."""
    errors = []
    for encoding in ("index", "onehot"):
        try:
            result = runner(encoding)(case)
        except UserCodeError as err:
            errors.append(err)
            continue
        if result is not None and result.shape == case.x.shape:
            return encoding
    if len(errors) == 2:
        raise UserCodeError(f"{errors[0]}\n(with one-hot labels it raised too)")
    return "index"


def _judge(report, matched, run_one, large, dtype):
    best = matched[0]
    report.headline = f"it computes {best.name}."
    if len(matched) > 1:
        report.notes.append("same values as: " + "; ".join(c.name for c in matched[1:]) + ".")
    report.why, report.fix = best.why, best.fix
    if not best.correct:
        return
    unstable = _instability(run_one, large, best, dtype)
    if unstable:
        report.headline, report.why = unstable
        report.fix = "shift each row by its own max before exp, or call softgrad: " + best.fix
        return
    report.verdict = "correct"
    try:
        yours, ours = timing(run_one, best, dtype)
    except UserCodeError:
        report.notes.append("speed not measured: the function raised on a 64×32 batch.")
        return
    report.notes.append(f"speed on a 64×32 batch: yours {yours * 1e3:.3g} ms, "
                        f"softgrad {ours * 1e3:.3g} ms.")
    if yours > 0.005 and yours > 10 * ours:
        report.headline = (f"it computes {best.name}, correctly but {yours / ours:.0f}× "
                           "slower than softgrad.")


def _no_match(report, result, case, comparisons):
    shape = "no array" if result is None else "shape " + "×".join(map(str, result.shape))
    closest = min(comparisons, key=lambda c: c.error)
    report.headline = (f"it matches none of the candidates (yours returned {shape} for logits "
                       f"of shape {case.x.shape[0]}×{case.x.shape[1]}).")
    report.why = ("A gradient with respect to the logits has their shape, N×C; an explicit "
                  "Jacobian is N×C×C.")
    if np.isfinite(closest.error):
        report.why += (f" The closest candidate is {closest.name}, off by {closest.error:.3g} "
                       f"(tolerance {closest.tolerance:.2g}).")
    report.fix = {
        "labels": 'loss, dx = softgrad.cross_entropy_with_grad(x, labels)',
        "upstream": "dx = softgrad.softmax_vjp(softgrad.softmax(x), dy)",
        "logits": "J = softgrad.softmax_jacobian(x)",
    }[report.kind]
    return report


def _instability(run_one, case, candidate, dtype):
    """None when the function is right on large logits; else (headline, why)."""
    result, reference = run_one(case), candidate.compute(case)
    if result is None or result.shape != reference.shape:
        return "right formula, but not on large logits.", f"On {case.title} it returns another shape."
    off = np.abs(result - reference) > tolerance(reference, result, dtype)
    bad = (off | ~np.isfinite(result)).reshape(len(result), -1).any(axis=1)
    if not bad.any():
        return None
    rows = ", ".join(map(str, np.flatnonzero(bad)))
    where = (f"It is right on ordinary logits, but not on rows {rows} of a batch whose rows "
             "sit near 0, +1000 and −1000")
    if np.array_equal(bad, _broken_rows(case.x, dtype, shift="none")):
        return ("right formula, but its softmax has no max shift and overflows on large logits.",
                f"{where}: its softmax exponentiates the raw logits, and exp overflows to inf "
                f"above ≈{np.log(np.finfo(dtype).max):.0f} in {dtype}, and a row far below 0 "
                "underflows to 0/0. Subtract each row's max first: "
                "exp(x − x.max(axis=-1, keepdims=True)).")
    if np.array_equal(bad, _broken_rows(case.x, dtype, shift="global")):
        return ("right formula, but it shifts by one global max, so rows far below it become NaN.",
                f"{where}: its softmax subtracts one max over the whole batch instead of each "
                "row's own max, so a row far below the batch's largest logit underflows to "
                "exp(−1000) = 0 everywhere and becomes 0/0. Use x.max(axis=-1, keepdims=True).")
    return "right formula, but not on large logits.", f"{where}."


def _broken_rows(x, dtype, *, shift):
    """Rows where a softmax with that max shift ('none' or 'global') is not finite."""
    z = x.astype(dtype)
    with np.errstate(all="ignore"):
        e = np.exp(z - z.max()) if shift == "global" else np.exp(z)
        return ~np.isfinite(e / e.sum(axis=-1, keepdims=True)).all(axis=-1)


def render(report, target):
    """The report as the text ``softgrad check`` prints."""
    lines = [
        f"softgrad check {target}",
        f"  kind: {report.kind} ({_KINDS[report.kind]});  framework: {report.framework};"
        f"  dtype: {report.dtype}",
        "  inputs: " + ", ".join(report.inputs),
        "",
        f"    {'candidate':<58}{'max error':>11}  tolerance",
        *(_table_row(c) for c in report.comparisons),
        "",
        f"verdict: {report.verdict.upper()}: {report.headline}",
        textwrap.fill(report.why, 88, initial_indent="  ", subsequent_indent="  "),
        f"fix: {report.fix}",
        *report.notes,
    ]
    return "\n".join(lines)


def _table_row(cmp):
    mark = "→ " if cmp.matches else "  "
    if cmp.problem:
        return f"  {mark}{cmp.name:<58}{cmp.problem:>11}  ({cmp.shape})"
    return f"  {mark}{cmp.name:<58}{cmp.error:>11.2e}  {cmp.tolerance:.1e}"
