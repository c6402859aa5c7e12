"""`import softgrad` imports no framework and adds little to NumPy's import time."""

import subprocess
import sys

FRAMEWORKS = ("tensorflow", "torch", "jax", "numba", "matplotlib", "keras")


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_import_imports_no_framework():
    loaded = run_python(
        "import sys, softgrad\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    assert loaded == "", f"import softgrad imported {loaded}"


def test_calls_on_numpy_arrays_import_no_framework():
    loaded = run_python(
        "import sys, numpy as np, softgrad as sg\n"
        "x = np.ones((3, 4)); y = sg.softmax(x)\n"
        "sg.softmax_vjp(y, x); sg.cross_entropy_with_grad(x, np.zeros(3, dtype=int))\n"
        f"print(','.join(m for m in {('tensorflow', 'torch', 'jax', 'matplotlib')!r} if m in sys.modules))"
    )
    assert loaded == ""


def test_import_time_above_numpy_is_under_100_ms():
    """Best of several fresh interpreters, timing only `import softgrad` after NumPy."""
    code = (
        "import time, numpy\n"
        "t = time.perf_counter(); import softgrad; print(time.perf_counter() - t)"
    )
    best = min(float(run_python(code)) for _ in range(7))
    assert best < 0.100, f"import softgrad took {best * 1000:.1f} ms on top of numpy"
