"""The pool of large kernel outputs: memory is reused only when no array uses it."""

import gc
import threading

import numpy as np
import pytest

import softgrad
from softgrad import kernels
from softgrad.kernels import _buffers

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="the compiled kernels are not in use")

# float32 rows of 16384 entries: 64 rows are exactly the pool's smallest size
ROWS, COLS = 64, 16384
assert ROWS * COLS * 4 == _buffers.MIN_BYTES


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile the kernels these tests call, on inputs too small to pool.

    A call that compiles a kernel leaves a reference cycle that holds its
    arguments, the pooled output among them, until the garbage collector
    runs: that buffer is not reused before then. Every later call holds
    nothing, which is what these tests are about.
    """
    # short rows and long ones (C >= 256) go to different kernels
    for small in (np.zeros((2, 8), np.float32), np.zeros((2, COLS), np.float32)):
        softgrad.softmax(small)
        softgrad.cross_entropy_with_grad(small, np.zeros(2, np.int64))
    gc.collect()


@pytest.fixture(autouse=True)
def empty_pool():
    kernels.release_buffers()
    yield
    kernels.release_buffers()


def _logits(seed):
    return np.random.default_rng(seed).normal(0.0, 3.0, (ROWS, COLS)).astype(np.float32)


def _address(a):
    return a.__array_interface__["data"][0]


def test_a_dropped_output_is_reused():
    first = softgrad.softmax(_logits(0))
    address = _address(first)
    del first
    assert _address(softgrad.softmax(_logits(1))) == address


def test_memory_still_viewed_is_never_reused():
    x0, x1 = _logits(0), _logits(1)
    first = softgrad.softmax(x0)
    expected = first.copy()
    views = [first[3:], first.reshape(-1)[::7], first.T, memoryview(first), first.view(np.int32)]
    del first
    second = softgrad.softmax(x1)
    for view in views:
        assert not np.shares_memory(np.asarray(view), second)
    np.testing.assert_array_equal(np.asarray(views[0]), expected[3:])
    np.testing.assert_array_equal(second, softgrad.softmax(x1))


def test_every_live_output_has_its_own_memory():
    x = _logits(0)
    outputs = [softgrad.softmax(x) for _ in range(3)]
    _, grad = softgrad.cross_entropy_with_grad(x, np.zeros(ROWS, np.int64))
    outputs.append(grad)
    for i, a in enumerate(outputs):
        for b in outputs[i + 1:]:
            assert not np.shares_memory(a, b)


def test_small_outputs_are_not_pooled():
    softgrad.softmax(_logits(0)[: ROWS // 2])
    assert _buffers.held() == (0, 0)


def test_the_pool_is_bounded_and_release_gives_memory_back():
    x = _logits(0)
    live = [softgrad.softmax(x) for _ in range(_buffers.MAX_BUFFERS + 3)]
    count, nbytes = _buffers.held()
    assert count == _buffers.MAX_BUFFERS
    assert kernels.release_buffers() == 0  # all in use
    del live
    assert kernels.release_buffers() == nbytes
    assert _buffers.held() == (0, 0)


def test_the_oldest_free_buffer_makes_room_for_a_new_size():
    x = _logits(0)
    live = [softgrad.softmax(x) for _ in range(_buffers.MAX_BUFFERS - 1)]
    softgrad.softmax(x)  # the eighth buffer, free once dropped
    wider = np.concatenate([x, x], axis=1)
    out = softgrad.softmax(wider)
    pad = _buffers.ALIGN
    assert _buffers.held() == (_buffers.MAX_BUFFERS, (_buffers.MAX_BUFFERS - 1) * (x.nbytes + pad) + wider.nbytes + pad)
    assert all(not np.shares_memory(out, a) for a in live)


def test_threads_get_distinct_buffers():
    xs = [_logits(seed) for seed in range(4)]
    expected = [softgrad.softmax(x).copy() for x in xs]
    kernels.release_buffers()
    results = [None] * len(xs)
    barrier = threading.Barrier(len(xs))

    def work(i):
        barrier.wait()
        for _ in range(5):
            results[i] = softgrad.softmax(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_pooled_outputs_start_on_a_cache_line():
    # the streaming stores of large outputs need 64-byte aligned rows
    for _ in range(3):
        assert softgrad.softmax(_logits(0)).ctypes.data % _buffers.ALIGN == 0
