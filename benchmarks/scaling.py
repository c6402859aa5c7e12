"""Time and memory of the explicit Jacobian against the VJP, over C.

The Jacobian writes N*C*C numbers, the VJP N*C: the log-log plot shows the
slopes 2 and 1. Jacobians larger than ``budget_bytes`` are not built; their
points are left out of the plot rather than swapping the machine.
"""

import numpy as np

import softgrad
from harness import time_thunk

CLASSES = [16, 64, 256, 1024, 4096, 16384, 65536]
ROWS = 4


def measure(*, runs, budget_bytes):
    """Rows of (C, jacobian ms, jacobian MiB, vjp ms, vjp MiB); None where skipped."""
    rng = np.random.default_rng(0)
    rows = []
    for n_classes in CLASSES:
        x = rng.normal(size=(ROWS, n_classes)).astype(np.float32)
        dy = rng.normal(size=x.shape).astype(np.float32)
        vjp = time_thunk(lambda: softgrad.softmax_vjp(softgrad.softmax(x), dy), runs=runs, warmup=1, memory=True)
        jacobian = None
        if ROWS * n_classes * n_classes * x.itemsize <= budget_bytes:
            jacobian = time_thunk(lambda: softgrad.softmax_jacobian(x), runs=runs, warmup=1, memory=True)
        rows.append((n_classes, jacobian, vjp))
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, value, label in ((ax_time, lambda t: t.median_ms, "time (ms)"),
                             (ax_mem, lambda t: t.peak_mib, "peak memory (MiB)")):
        for index, name in ((1, "explicit Jacobian (N·C·C)"), (2, "VJP (N·C)")):
            points = [(row[0], value(row[index])) for row in rows if row[index] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"softmax Jacobian vs VJP, {ROWS} rows, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
