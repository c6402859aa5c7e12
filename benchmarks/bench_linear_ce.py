"""Linear + cross-entropy, forward and backward: softgrad's chunked paths against the plain ones.

    python benchmarks/bench_linear_ce.py            # the two shapes of issue 5 and the memory sweep
    python benchmarks/bench_linear_ce.py --quick    # smaller shapes, fewer runs

`softgrad bench` also runs these shapes through the shared harness
(``cases`` below: time, and tracemalloc memory for the NumPy columns); this
script adds what the harness cannot see, the peak memory of TensorFlow and
PyTorch, and the PyTorch chunked path.

Every (case, shape) runs in two fresh interpreters, so that one case's
memory cannot be reused by the next. In each, inputs are made and one call
warms up (and compiles); nothing of that call is kept (the PyTorch case
clears the leaves' ``.grad``). Then:

1. the timing interpreter makes `--runs` timed calls (median and min-max),
   and one more call gives ``peak_MiB``, the peak memory above what was
   held before it (the inputs, the frameworks), counted by each framework's
   own means:

   * TensorFlow's allocator (``tf.config.experimental.get_memory_info``)
     for the TF cases;
   * ``tracemalloc``, which NumPy reports every array to, for NumPy;
   * resident memory (below) for PyTorch, which keeps no count of CPU memory;

2. the memory interpreter makes one more call and gives ``rss_MiB``, the
   same method for every case: the growth of the process's peak resident
   memory during the call (VmHWM, reset through /proc/self/clear_refs just
   before it, minus VmRSS then). For every allocation to show, large blocks
   must go back to the system when freed: glibc does that with
   ``MALLOC_MMAP_THRESHOLD_=65536``, and TensorFlow's oneDNN CPU allocator,
   which otherwise keeps freed memory in a pool (so the resident size would
   not grow after the warm-up call), uses plain malloc with
   ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1``. Timings are not taken here, since
   that allocator changes them.

``peak_MiB`` and ``rss_MiB`` agree to a few MiB for TensorFlow; ``rss_MiB`` is
the apples-to-apples column across frameworks. Both include the gradients
themselves (dW is D*V*4 bytes, dh N*D*4), which every path must produce.
Results are appended to benchmarks/results/linear_ce.csv; the plot of peak
memory against V (``rss_MiB``) goes to benchmarks/results/linear_ce_memory.png.
"""

import argparse
import csv
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

RESULTS = pathlib.Path(__file__).with_name("results")
SHAPES = [(4096, 256, 32768), (2048, 256, 131072)]
QUICK_SHAPES = [(1024, 128, 16384)]
SWEEP_N, SWEEP_D = 2048, 256
SWEEP_V = [4096, 8192, 16384, 32768, 65536, 131072]
QUICK_SWEEP_V = [2048, 8192, 32768]
CASES = ["tf_plain", "tf_plain_xla", "tf_softgrad", "numpy_softgrad", "torch_plain", "torch_chunked"]
SWEEP_CASES = ["tf_plain", "tf_softgrad", "torch_plain", "torch_chunked"]
MiB = 2**20


# -- the cases: each returns a function that runs forward + backward once --


def _inputs(n, d, v):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = (rng.standard_normal((d, v), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    t = rng.integers(0, v, size=n)
    return h, w, t


def _tf_case(name, h, w, t):
    import tensorflow as tf

    import softgrad as sg

    h, w, t = tf.constant(h), tf.constant(w), tf.constant(t)

    def plain(h, w, t):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(t, tf.matmul(h, w)))
        return loss, tape.gradient(loss, [h, w])

    def chunked(h, w, t):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            loss = sg.linear_cross_entropy(h, w, t)
        return loss, tape.gradient(loss, [h, w])

    body = chunked if name == "tf_softgrad" else plain
    step = tf.function(body, jit_compile=name == "tf_plain_xla")

    def run():
        loss, grads = step(h, w, t)
        return float(loss), grads

    return run


def _numpy_case(h, w, t):
    import softgrad as sg

    return lambda: sg.linear_cross_entropy_with_grad(h, w, t)


def _torch_case(name, h, w, t):
    import torch
    import torch.nn.functional as F

    h = torch.from_numpy(h).requires_grad_()
    t = torch.from_numpy(t)
    if name == "torch_plain":
        w = torch.from_numpy(w).requires_grad_()

        def loss():
            return F.cross_entropy(h @ w, t)
    else:
        # PyTorch's weight is (V, D), like nn.Linear.
        w = torch.from_numpy(np.ascontiguousarray(w.T)).requires_grad_()
        options = torch.nn.LinearCrossEntropyOptions()

        def loss():
            return F.linear_cross_entropy(h, w, t, options=options)

    def run():
        value = loss()
        value.backward()
        # The leaves must not keep the gradients: the memory measured before
        # the next call would include them, and freeing them during the
        # call would hide as much of its own peak.
        grads = (h.grad, w.grad)
        h.grad = w.grad = None
        return float(value.detach()), grads

    return run


def _naive_numpy(h, w, t):
    """The plain path in NumPy: the full logits, then cross-entropy and its gradient."""
    n = len(t)
    x = h @ w
    x -= x.max(axis=1, keepdims=True)
    e = np.exp(x)
    total = e.sum(axis=1, keepdims=True)
    loss = np.mean(np.log(total[:, 0]) - x[np.arange(n), t])
    g = e / total
    g[np.arange(n), t] -= 1
    g /= n
    return loss, g @ w.T, h.T @ g


def cases(quick):
    """The shapes of the table for ``softgrad bench``: softgrad's TF path against
    plain TF and PyTorch, softgrad's NumPy path against the naive NumPy one."""
    from harness import Case

    out = []
    for n, d, v in QUICK_SHAPES if quick else SHAPES:
        def inputs(n=n, d=d, v=v):
            return _inputs(n, d, v)

        out.append(Case("linear_cross_entropy fwd+bwd (TF path)", (n, d, v), "float32", {
            "softgrad": lambda i=inputs: _tf_case("tf_softgrad", *i()),
            "tf": lambda i=inputs: _tf_case("tf_plain", *i()),
            "torch": lambda i=inputs: _torch_case("torch_plain", *i()),
        }, numpy_buffers=False))
        out.append(Case("linear_cross_entropy fwd+bwd (NumPy path)", (n, d, v), "float32", {
            "softgrad": lambda i=inputs: _numpy_case(*i()),
            "numpy": lambda i=inputs: (lambda h, w, t: lambda: _naive_numpy(h, w, t))(*i()),
        }))
    return out


def make_case(name, n, d, v):
    h, w, t = _inputs(n, d, v)
    if name.startswith("tf_"):
        return _tf_case(name, h, w, t)
    if name.startswith("torch_"):
        return _torch_case(name, h, w, t)
    return _numpy_case(h, w, t)


# -- measuring, in the child process ----------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_rss(run):
    """MiB by which the peak resident memory grows during one call."""
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    result = run()
    peak = _status_kib("VmHWM") - before
    del result
    return peak / 1024, "rss"


def _peak_tf(run):
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    result = run()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    del result
    return peak / MiB, "tf allocator"


def _peak_traced(run):
    import tracemalloc

    tracemalloc.start()
    result = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak / MiB, "tracemalloc"


def measure(name, n, d, v, runs):
    run = make_case(name, n, d, v)
    run()
    if runs == 0:
        return {"rss_MiB": _peak_rss(run)[0]}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        del result
    peak = {"tf": _peak_tf, "numpy": _peak_traced, "torch": _peak_rss}[name.split("_")[0]]
    peak_mib, method = peak(run)
    return {
        "time_s": float(np.median(times)),
        "time_min_s": min(times),
        "time_max_s": max(times),
        "peak_MiB": peak_mib,
        "memory_by": method,
    }


# -- the parent: one child per measurement, then the table, CSV and plot ----


def _child(name, n, d, v, runs, **env):
    # Resident memory shows every allocation only when large blocks go back
    # to the system on free; that makes each large allocation fault its pages
    # afresh, so timed runs keep malloc's default (except PyTorch, whose
    # peak is only seen through resident memory).
    counted = runs == 0 or name.startswith("torch")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **({"MALLOC_MMAP_THRESHOLD_": "65536"} if counted else {}), **env}
    args = [sys.executable, __file__, "--child", name, str(n), str(d), str(v), str(runs)]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} at {(n, d, v)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(name, n, d, v, runs):
    """Times and the framework's own peak (runs >= 1), then the resident peak, each in a fresh interpreter."""
    timed = _child(name, n, d, v, runs) if runs else {}
    return {**timed, **_child(name, n, d, v, 0, TF_ONEDNN_USE_SYSTEM_ALLOCATOR="1")}


def available(name):
    module = {"tf": "tensorflow", "torch": "torch"}.get(name.split("_")[0])
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def floor_mib(n, d, v):
    """dW + dh in float32: what every path must return, the least any peak can be."""
    return (d * v + n * d) * 4 / MiB


def table(rows):
    """The results, with each case's ratios to plain TF at the same shape."""
    base = {(r["N"], r["D"], r["V"]): r for r in rows if r["case"] == "tf_plain"}
    print(f"{'case':<15} {'N':>5} {'D':>4} {'V':>7} {'time_s':>7} {'min-max_s':>13} {'peak_MiB':>9} "
          f"{'memory_by':<13} {'rss_MiB':>8} {'floor_MiB':>9} {'time/tf_plain':>13} {'peak/tf_plain':>13} "
          f"{'rss/tf_plain':>12}")
    for r in rows:
        b = base.get((r["N"], r["D"], r["V"]))
        time_ratio = r["time_s"] / b["time_s"] if b else float("nan")
        mem_ratio = r["peak_MiB"] / b["peak_MiB"] if b else float("nan")
        rss_ratio = r["rss_MiB"] / b["rss_MiB"] if b else float("nan")
        print(f"{r['case']:<15} {r['N']:>5} {r['D']:>4} {r['V']:>7} {r['time_s']:>7.3f} "
              f"{r['time_min_s']:>6.3f}-{r['time_max_s']:<6.3f} {r['peak_MiB']:>9.1f} {r['memory_by']:<13} "
              f"{r['rss_MiB']:>8.1f} {floor_mib(r['N'], r['D'], r['V']):>9.1f} "
              f"{time_ratio:>13.2f} {mem_ratio:>13.3f} {rss_ratio:>12.3f}")


def write_csv(rows):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "linear_ce.csv"
    fields = ["date", "machine", "case", "N", "D", "V", "time_s", "time_min_s", "time_max_s",
              "peak_MiB", "memory_by", "rss_MiB"]
    old = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:  # an older file without a column: rewrite it
                old = list(reader)
    new = not path.exists() or bool(old)
    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        if new:
            writer.writeheader()
            writer.writerows(old)
        stamp = time.strftime("%Y-%m-%d %H:%M")
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        for r in rows:
            writer.writerow({"date": stamp, "machine": machine, **r})
    return path


def plot(sweep, cases, path=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in cases:
        pts = [(r["V"], r["rss_MiB"]) for r in sweep if r["case"] == name]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=name)
    vs = sorted({r["V"] for r in sweep})
    ax.loglog(vs, [floor_mib(SWEEP_N, SWEEP_D, v) for v in vs], "k--", lw=1, label="dW + dh (floor)")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("peak resident memory above inputs (MiB)")
    ax.set_title(f"Linear + cross-entropy, fwd + bwd, N={SWEEP_N}, D={SWEEP_D}, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = path or RESULTS / "linear_ce_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


REPORT_CASES = ["tf_plain", "tf_softgrad", "torch_chunked", "numpy_softgrad"]


def report(quick, out_dir):
    """Memory in fresh interpreters, which the harness cannot see.

    Peak resident memory above the inputs of each path, one fresh
    interpreter per measurement (as ``rss_MiB`` above), against plain TF and
    the dW + dh floor, at the shapes of :func:`cases`; then the plot of
    memory against V. Returns the table as text and the plot's path.
    """
    cases = [c for c in REPORT_CASES if available(c)]
    lines = [f"{'linear CE path':<15} {'N x D x V':>17} {'rss_MiB':>8} {'floor_MiB':>9} {'rss/tf_plain':>12}"]
    for n, d, v in QUICK_SHAPES if quick else SHAPES:
        rss = {name: run_child(name, n, d, v, 0)["rss_MiB"] for name in cases}
        for name in cases:
            ratio = rss[name] / rss["tf_plain"] if "tf_plain" in rss else float("nan")
            lines.append(f"{name:<15} {f'{n}x{d}x{v}':>17} {rss[name]:>8.1f} {floor_mib(n, d, v):>9.1f} {ratio:>12.3f}")
    sweep_cases = [c for c in SWEEP_CASES if available(c) and not (quick and c == "torch_plain")]
    sweep = [{"case": name, "N": SWEEP_N, "D": SWEEP_D, "V": v, **run_child(name, SWEEP_N, SWEEP_D, v, 0)}
             for v in (QUICK_SWEEP_V if quick else SWEEP_V) for name in sweep_cases]
    os.makedirs(out_dir, exist_ok=True)
    return "\n".join(lines), plot(sweep, sweep_cases, pathlib.Path(out_dir) / "linear_ce_memory.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 runs")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--shapes", nargs="+", metavar="NxDxV", help="instead of the default shapes")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--no-sweep", action="store_true", help="skip the memory-against-V plot")
    parser.add_argument("--only-sweep", action="store_true", help="only the memory-against-V plot")
    parser.add_argument("--sweep-cases", nargs="+", default=SWEEP_CASES, choices=CASES,
                        help="cases of the memory-against-V plot")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, n, d, v, runs = args.child
        print(json.dumps(measure(name, int(n), int(d), int(v), int(runs))))
        return
    runs = args.runs or (3 if args.quick else 5)
    cases = [c for c in args.cases if available(c)]
    missing = sorted(set(args.cases) - set(cases))
    if missing:
        print(f"skipped (framework not installed): {', '.join(missing)}")
    rows = []
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else None
    for n, d, v in [] if args.only_sweep else shapes or (QUICK_SHAPES if args.quick else SHAPES):
        for name in cases:
            rows.append({"case": name, "N": n, "D": d, "V": v, **run_child(name, n, d, v, runs)})
    if rows:
        table(rows)
        print(f"results appended to {write_csv(rows)}")
    if not args.no_sweep:
        sweep = []
        for v in QUICK_SWEEP_V if args.quick else SWEEP_V:
            for name in (c for c in args.sweep_cases if available(c)):
                sweep.append({"case": name, "N": SWEEP_N, "D": SWEEP_D, "V": v,
                              **run_child(name, SWEEP_N, SWEEP_D, v, 0)})
        write_csv(sweep)
        print(f"memory against V: {plot(sweep, args.sweep_cases)}")


if __name__ == "__main__":
    main()
