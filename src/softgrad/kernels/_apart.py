"""Compiling a kernel in a child process, so that this process loads it from numba's cache.

Why: a kernel calls its helpers (``_rows.sum_exp``, ``_cross_entropy._grad_row``,
the parallel loop's body, ...) through symbols. numba compiles each helper
on its own first, optimised once, and then links a copy of it into the
kernel, where the whole is optimised a second time; some of the helpers'
loops (the cross-entropy gradient's, the log-softmax output's) are
vectorised only in that second round. A process that compiled the kernel
holds both copies, and the JIT linker binds the kernel's calls to the
first, standalone one: such a process ran cross-entropy at 1024 x 32768 in
43 ms, against 19 ms in a process that loaded the same kernel from the
cache (which holds the kernel's own copies only), and log-softmax in 24
against 17 ms.

So when numba is about to compile a kernel here, :func:`call` stops it
(numba's ``"numba:compile"`` event comes after its cache lookup missed),
compiles that signature in a child Python process, which writes it to the
cache, and calls the kernel again, which now loads it. Where that fails
(no interpreter to start, a cache that cannot be written), the kernel is
compiled here as before: the same results, at the speed above.
"""

import os
import pickle
import subprocess
import sys

from numba.core import event

# The interpreter for the child; None compiles in this process (frozen
# applications, whose executable is not a Python). A module attribute so
# that a test can make the child fail.
PYTHON = None if getattr(sys, "frozen", False) else sys.executable

# Where the child imports softgrad from: this process's copy.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from softgrad.kernels import _apart; _apart.child()"


class _CompileApart(Exception):
    """Raised from numba's compile event to stop compiling here; holds the argument types."""

    def __init__(self, arg_types):
        super().__init__(arg_types)
        self.arg_types = arg_types


class _StopCompiling(event.Listener):
    def __init__(self, kernel):
        self.kernel = kernel

    def on_start(self, ev):
        if ev.data["dispatcher"] is self.kernel:
            raise _CompileApart(ev.data["args"])

    def on_end(self, ev):
        pass


_listeners = {}


def call(kernel, args):
    """``kernel(*args)``, where a kernel missing from numba's cache is compiled in a child process."""
    listener = _listeners.get(kernel)
    if listener is None:
        listener = _listeners.setdefault(kernel, _StopCompiling(kernel))
    event.register("numba:compile", listener)
    try:
        return kernel(*args)
    except _CompileApart as stop:
        compile_apart(kernel, stop.arg_types)
    finally:
        event.unregister("numba:compile", listener)
    # From the cache now; compiled here if the child could not put it there.
    return kernel(*args)


def compile_apart(kernel, arg_types):
    """Compile ``kernel`` for ``arg_types`` (a tuple of numba types) in a
    child process, into numba's cache. A failure is not reported: the
    caller's next call then compiles in this process."""
    if PYTHON is None:
        return
    job = pickle.dumps((kernel.py_func.__module__, kernel.py_func.__qualname__, tuple(arg_types)))
    try:
        subprocess.run([PYTHON, "-c", _CHILD], input=job, capture_output=True, check=False)
    except OSError:
        pass


def child():
    """The child's side: read (module, name, argument types) from stdin and compile."""
    import importlib

    module, name, arg_types = pickle.load(sys.stdin.buffer)
    kernel = importlib.import_module(module)
    for part in name.split("."):
        kernel = getattr(kernel, part)
    kernel.compile(arg_types)
