"""The one benchmark harness: timing, peak memory, the bandwidth bound, the CSV.

A :class:`Case` is one operation at one shape with several implementations
(softgrad, naive NumPy, TensorFlow, PyTorch, ...), each given as a factory
that prepares its inputs and returns a no-argument function to time. Every
implementation is warmed up (compilation, caches, first-touch page faults of
the inputs), then timed ``runs`` times with the garbage collector paused, as
timeit does; the table reports the median and the spread (min and max). Peak memory is the tracemalloc peak of one extra call,
made after softgrad's pool of recycled outputs is emptied so that its
outputs count: it sees NumPy's buffers (softgrad's NumPy path, the kernels,
naive NumPy) but not TensorFlow's or PyTorch's own allocators, whose column
stays empty.

The memory-bandwidth bound of a case is ``bytes_moved / bandwidth``, with the
bandwidth measured in the same run as ``2 * nbytes / time(numpy.copyto)`` on
a buffer as large as the case's logits (one read and one write per byte).
"""

import csv
import datetime
import gc
import os
import platform
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from softgrad import kernels

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_COLUMNS = [
    "timestamp", "machine", "softgrad_path", "op", "shape", "dtype", "impl",
    "time_ms_median", "time_ms_min", "time_ms_max", "runs", "peak_mem_mib", "bound_ms",
]


@dataclass
class Case:
    """One operation at one shape; ``impls`` maps a name to a factory of a thunk.

    ``bytes_moved``: the bytes a perfect implementation must read and write,
    for the bandwidth bound (None for no bound). ``copy_bytes``: the size of
    the buffer whose copy measures the bandwidth (default: ``bytes_moved / 2``).
    ``numpy_buffers``: False where softgrad's implementation runs on
    TensorFlow, whose memory tracemalloc does not see (its cell stays empty
    rather than reading 0). ``turns``: time the implementations taking
    turns call by call, each at least ``turns`` times, instead of one after
    the other; for implementations that share one runtime's thread pools
    (softgrad's TF path against TensorFlow's own ops), where the slow drift
    of a shared machine would otherwise land on one of them (see
    :func:`time_in_turns`). None: one after the other.
    """

    op: str
    shape: tuple
    dtype: str
    impls: dict
    bytes_moved: float = None
    copy_bytes: int = None
    numpy_buffers: bool = True
    turns: int = None
    results: dict = field(default_factory=dict)
    bound_ms: float = None


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    peak_mib: float = None


def time_thunk(thunk, *, runs, warmup, memory):
    for _ in range(warmup):
        thunk()
    samples = time_in_turns({"thunk": thunk}, runs=runs)["thunk"]
    peak = None
    if memory:
        gc.collect()
        # A cold call: softgrad's pool of recycled outputs would hide them.
        kernels.release_buffers()
        tracemalloc.start()
        thunk()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return _timing(samples, peak)


def _timing(samples, peak=None):
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), peak)


def copy_bandwidth(nbytes, runs):
    """Bytes per millisecond that numpy.copyto moves (read + write) on ``nbytes``."""
    src = np.ones(max(int(nbytes) // 8, 1))
    dst = np.empty_like(src)
    timing = time_thunk(lambda: np.copyto(dst, src), runs=runs, warmup=2, memory=False)
    return 2 * src.nbytes / timing.median_ms


def time_in_turns(thunks, *, runs):
    """{name: [ms, ...]}: ``runs`` calls of each thunk, taking turns, the collector paused.

    Only for thunks on one runtime: between libraries it is unfair, since
    a call made right after another library's waits for that library's
    OpenMP threads to stop spinning (softgrad's cross-entropy at
    1024x32768 took 21.3 against 18.9 ms right after PyTorch's), and a
    pause between calls lets every call start cold (with a 20 ms pause
    alone 21.3 against 20.4 ms; taking turns with the other libraries
    after such pauses, 25.1 ms in a ``--quick`` run).
    """
    samples = {name: [] for name in thunks}
    # As timeit does: the collector runs once before the timed calls and not
    # during them. Collecting before every call made TensorFlow's timings
    # bimodal here (freed tensors hand their memory back, and the next call
    # faults it in again), by as much as 1.4x in the median.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(runs):
            for name, thunk in thunks.items():
                start = time.perf_counter()
                thunk()
                samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return samples


def run_case(case, *, runs, warmup, log=print):
    if case.bytes_moved is not None:
        copy_bytes = case.copy_bytes or case.bytes_moved / 2
        case.bound_ms = case.bytes_moved / copy_bandwidth(copy_bytes, runs)
    if case.turns:
        return _run_in_turns(case, max(runs, case.turns), warmup, log)
    for name, factory in case.impls.items():
        thunk = _thunk(case, name, factory, log)
        if thunk is None:
            continue
        memory = not name.startswith(("tf", "torch")) and (case.numpy_buffers or name != "softgrad")
        case.results[name] = time_thunk(thunk, runs=runs, warmup=warmup, memory=memory)
        del thunk
        gc.collect()
    return case


def _thunk(case, name, factory, log):
    """The implementation's thunk, or None where its framework is missing (logged)."""
    try:
        return factory()
    except ImportError as error:
        log(f"  {case.op} {name}: skipped ({error})")
        return None


def _run_in_turns(case, runs, warmup, log):
    thunks = {}
    for name, factory in case.impls.items():
        thunk = _thunk(case, name, factory, log)
        if thunk is None:
            continue
        for _ in range(warmup):
            thunk()
        thunks[name] = thunk
    for name, ms in time_in_turns(thunks, runs=runs).items():
        case.results[name] = _timing(ms)
    return case


def append_csv(cases, softgrad_path, path=None):
    path = path or os.path.join(RESULTS, "results.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}"
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        if new:
            writer.writeheader()
        for case in cases:
            for impl, t in case.results.items():
                writer.writerow({
                    "timestamp": stamp, "machine": machine, "softgrad_path": softgrad_path,
                    "op": case.op, "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
                    "impl": impl, "time_ms_median": f"{t.median_ms:.3f}", "time_ms_min": f"{t.min_ms:.3f}",
                    "time_ms_max": f"{t.max_ms:.3f}", "runs": t.runs,
                    "peak_mem_mib": "" if t.peak_mib is None else f"{t.peak_mib:.1f}",
                    "bound_ms": "" if case.bound_ms is None else f"{case.bound_ms:.3f}",
                })
    return path
