"""Run every benchmark: the table, the CSV in results/, the scaling plot.

    python benchmarks/suite.py [--quick] [--out DIR]

or ``softgrad bench [--quick]`` from a source checkout. Cases come from every
``bench_*.py`` module next to this file (see README.md).
"""

import argparse
import glob
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("softgrad", "numpy", "tf", "torch")


def discover():
    """The ``cases`` functions of the bench_*.py modules, in name order.

    A module without ``cases`` is a script of its own (run it directly).
    """
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    modules = [importlib.import_module(name) for name in names]
    return [(m.__name__, m.cases) for m in modules if hasattr(m, "cases")]


def reports():
    """The ``report(quick, out_dir)`` functions of the bench_*.py modules: what
    the shared harness cannot measure (e.g. memory in a fresh interpreter)."""
    discover()
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    modules = [importlib.import_module(name) for name in names]
    return [(m.__name__, m.report) for m in modules if hasattr(m, "report")]


def _ms(timing):
    return f"{timing.median_ms:9.1f}" if timing else f"{'-':>9}"


def _ratio(a, b):
    return f"{a.median_ms / b.median_ms:7.2f}x" if a and b else f"{'-':>8}"


def table(cases):
    head = (f"{'op':<46} {'shape':>12} " + " ".join(f"{c + ' ms':>9}" for c in COLUMNS)
            + f" {'bound ms':>9} {'numpy/sg':>8} {'tf/sg':>8} {'torch/sg':>8} {'sg/bound':>8}")
    lines = [head, "-" * len(head)]
    for case in cases:
        r = case.results
        sg = r.get("softgrad")
        bound = f"{case.bound_ms:9.1f}" if case.bound_ms else f"{'-':>9}"
        sg_bound = f"{sg.median_ms / case.bound_ms:7.2f}x" if sg and case.bound_ms else f"{'-':>8}"
        lines.append(
            f"{case.op:<46} {'x'.join(map(str, case.shape)):>12} "
            + " ".join(_ms(r.get(c)) for c in COLUMNS)
            + f" {bound} {_ratio(r.get('numpy'), sg)} {_ratio(r.get('tf'), sg)} {_ratio(r.get('torch'), sg)} {sg_bound}"
        )
    return "\n".join(lines)


def memory_table(cases):
    lines = [f"{'op':<46} {'shape':>12} {'softgrad MiB':>13} {'numpy MiB':>10}"]
    for case in cases:
        mib = [case.results.get(c) for c in ("softgrad", "numpy")]
        cells = [f"{t.peak_mib:.1f}" if t and t.peak_mib is not None else "-" for t in mib]
        lines.append(f"{case.op:<46} {'x'.join(map(str, case.shape)):>12} {cells[0]:>13} {cells[1]:>10}")
    return "\n".join(lines)


def main(quick=False, out_dir="."):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import harness
    import scaling
    from softgrad import kernels

    runs, warmup = (3, 1) if quick else (7, 2)
    status = kernels.status()
    print(f"softgrad NumPy path: {status['path']} ({status['reason']}); {runs} runs per case, median")
    cases = []
    for module, make_cases in discover():
        for case in make_cases(quick):
            print(f"  {module}: {case.op} {case.shape}", flush=True)
            cases.append(harness.run_case(case, runs=runs, warmup=warmup))
    print()
    print(table(cases))
    print()
    print(memory_table(cases))
    os.makedirs(out_dir, exist_ok=True)
    csv_path = harness.append_csv(cases, status["path"])
    harness.append_csv(cases, status["path"], os.path.join(out_dir, "bench.csv"))
    rows = scaling.measure(runs=runs, budget_bytes=2**28 if quick else 2**30)
    png = scaling.plot(rows, os.path.join(out_dir, "softgrad-scaling.png"))
    print(f"\nresults appended to {csv_path} and {out_dir}/bench.csv\nscaling plot: {png}")
    for module, report in reports():
        print(f"\n{module}: {report.__doc__.splitlines()[0]}", flush=True)
        text, plot = report(quick, out_dir)
        print(text)
        if plot:
            print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller cases")
    parser.add_argument("--out", default=".", help="folder for the scaling plot")
    args = parser.parse_args()
    sys.exit(main(args.quick, args.out))
