"""Reuse of large output buffers from one kernel call to the next.

A new NumPy array of more than a few MiB is memory fresh from the operating
system, which zeroes every page on its first write: for a (1024, 32768)
float32 gradient that is 128 MiB of zeroing, 6-12 ms here, as long as the
fused kernel's own work. A training loop asks for outputs of the same size
at every step, so the kernels take large outputs from a small pool and skip
the zeroing from the second step on.

The pool owns each buffer (a 1-D ``uint8`` array) and hands out views of it.
Every view of such a view keeps the pooled buffer itself as its ``base``, so
while any array still uses the memory the buffer's reference count is above
the pool's own; a buffer is reused only when nothing but the pool refers to
it. The count that means "free" is measured, not assumed: interpreters
differ in how many references a call adds.

What the pool keeps is bounded: at most ``MAX_BUFFERS`` buffers, the least
recently used free one dropped first, and a buffer is added only when every
buffer of that size is in use, so the free memory it holds was in use as
outputs at some point. :func:`release` drops every free buffer.

The call that compiles a kernel leaves behind a reference cycle that holds
its arguments until the garbage collector runs; an output it wrote into a
pooled buffer keeps that buffer busy until then, and the next call of that
size takes another. Later calls hold nothing.
"""

import sys
import threading

import numpy as np

# Below this, malloc hands freed memory back to the next allocation itself.
MIN_BYTES = 1 << 22
MAX_BUFFERS = 8
ALIGN = 64

_lock = threading.Lock()
_buffers = []  # least recently used first


def _references(buffers, i):
    return sys.getrefcount(buffers[i])


def _count_when_free():
    probe = [np.empty(1, np.uint8)]
    return _references(probe, 0)


_FREE = _count_when_free()


def empty(shape, dtype):
    """An uninitialised array like ``np.empty(shape, dtype)``, pooled when large.

    A pooled array starts on a 64-byte boundary (``ALIGN``), as streaming
    stores need (``_rows.stream_row``): a buffer has ``ALIGN`` bytes more
    than it hands out, and the array starts at the first boundary in it.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    with _lock:
        for i in range(len(_buffers)):
            if _buffers[i].nbytes == nbytes + ALIGN and _references(_buffers, i) == _FREE:
                _buffers.append(_buffers.pop(i))
                return _aligned(_buffers[-1], nbytes, dtype, shape)
        if len(_buffers) >= MAX_BUFFERS and not _drop_oldest_free():
            return np.empty(shape, dtype)
        _buffers.append(np.empty(nbytes + ALIGN, np.uint8))
        return _aligned(_buffers[-1], nbytes, dtype, shape)


def _aligned(buffer, nbytes, dtype, shape):
    start = -buffer.ctypes.data % ALIGN
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def _drop_oldest_free():
    for i in range(len(_buffers)):
        if _references(_buffers, i) == _FREE:
            del _buffers[i]
            return True
    return False


def release():
    """Drop every buffer no array uses any more; return the bytes given back."""
    with _lock:
        freed = 0
        for i in reversed(range(len(_buffers))):
            if _references(_buffers, i) == _FREE:
                freed += _buffers[i].nbytes
                del _buffers[i]
        return freed


def held():
    """(number of buffers, bytes) the pool holds, in use or not."""
    with _lock:
        return len(_buffers), sum(b.nbytes for b in _buffers)
