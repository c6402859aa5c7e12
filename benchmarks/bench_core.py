"""Benchmark cases of the softmax family and cross-entropy (issue: fast path).

Each ``cases(quick)`` returns :class:`harness.Case` objects whose ``impls`` use
the column names of the table: "softgrad", "numpy" (the naive one-liner),
"tf" and "torch". TensorFlow and PyTorch are imported inside the factories,
so a missing framework only empties its column.
"""

import numpy as np

import softgrad
from harness import Case


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    return x, rng.integers(0, shape[-1], shape[0]), rng.normal(size=shape).astype(np.float32)


# -- cross-entropy forward + backward -----------------------------------------


def _naive_cross_entropy(x, labels):
    rows = np.arange(len(labels))
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[rows, labels])
    grad = e / s
    grad[rows, labels] -= 1.0
    return loss, grad / len(labels)


def _tf_cross_entropy(x, labels):
    import tensorflow as tf

    xt, yt = tf.constant(x), tf.constant(labels)

    @tf.function
    def step(xt, yt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yt, logits=xt))
        return loss, tape.gradient(loss, xt)

    return lambda: [t.numpy() for t in step(xt, yt)]


def _torch_cross_entropy(x, labels):
    import torch
    import torch.nn.functional as F

    xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(labels)

    def step():
        xt.grad = None
        loss = F.cross_entropy(xt, yt)
        loss.backward()
        return loss.item(), xt.grad

    return step


def cross_entropy_case(shape, tf=True, torch=True):
    x, labels, _ = _data(shape)
    impls = {
        "softgrad": lambda: (lambda: softgrad.cross_entropy_with_grad(x, labels)),
        "numpy": lambda: (lambda: _naive_cross_entropy(x, labels)),
    }
    if tf:
        impls["tf"] = lambda: _tf_cross_entropy(x, labels)
    if torch:
        impls["torch"] = lambda: _torch_cross_entropy(x, labels)
    # read the logits, write the gradient
    return Case("cross_entropy fwd+bwd", shape, "float32", impls, bytes_moved=2 * x.nbytes)


# -- softmax followed by its VJP ----------------------------------------------


def _naive_softmax_vjp(x, dy):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    y = e / e.sum(axis=1, keepdims=True)
    return y, y * (dy - np.sum(dy * y, axis=1, keepdims=True))


def _softgrad_softmax_vjp(x, dy):
    y = softgrad.softmax(x)
    return y, softgrad.softmax_vjp(y, dy)


def _tf_softmax_vjp(x, dy):
    import tensorflow as tf

    xt, dyt = tf.constant(x), tf.constant(dy)

    @tf.function(jit_compile=True)
    def step(xt, dyt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.nn.softmax(xt)
        return y, tape.gradient(y, xt, output_gradients=dyt)

    return lambda: [t.numpy() for t in step(xt, dyt)]


def _torch_softmax_vjp(x, dy):
    import torch

    xt, dyt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)

    def step():
        y = torch.softmax(xt, dim=-1)
        return y, torch.autograd.grad(y, xt, dyt)[0]

    return step


def softmax_vjp_case(shape, tf=True, torch=True):
    x, _, dy = _data(shape)
    impls = {
        "softgrad": lambda: (lambda: _softgrad_softmax_vjp(x, dy)),
        "numpy": lambda: (lambda: _naive_softmax_vjp(x, dy)),
    }
    if tf:
        impls["tf"] = lambda: _tf_softmax_vjp(x, dy)
    if torch:
        impls["torch"] = lambda: _torch_softmax_vjp(x, dy)
    # read x, write y; read y and dy, write dx
    return Case("softmax+vjp (tf: XLA)", shape, "float32", impls, bytes_moved=5 * x.nbytes)


# -- the explicit Jacobian ----------------------------------------------------


def _tf_batch_jacobian(x):
    import tensorflow as tf

    xt = tf.constant(x)

    @tf.function
    def jacobian(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.nn.softmax(xt)
        return tape.batch_jacobian(y, xt)

    return lambda: jacobian(xt).numpy()


def _naive_jacobian(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    y = e / e.sum(axis=1, keepdims=True)
    return y[:, :, None] * (np.eye(x.shape[1], dtype=x.dtype) - y[:, None, :])


def jacobian_case(shape, tf=True):
    x, _, _ = _data(shape)
    impls = {
        "softgrad": lambda: (lambda: softgrad.softmax_jacobian(x)),
        "numpy": lambda: (lambda: _naive_jacobian(x)),
    }
    if tf:
        impls["tf"] = lambda: _tf_batch_jacobian(x)
    out_bytes = shape[0] * shape[1] * shape[1] * x.itemsize
    # writing the N*C*C output; the copy that measures bandwidth stays at 256 MiB
    return Case("softmax_jacobian", shape, "float32", impls, bytes_moved=out_bytes,
                copy_bytes=min(out_bytes, 2**28))


def report(quick, out_dir):
    """The explicit Jacobian against the fastest write of its output here.

    A bare fill of the (N, C, C) output with streaming stores, on every
    thread, one fence a thread, is as fast as any code can write it on
    this machine; the table's bound (from the copy bandwidth) also counts a
    read of each line, which such stores skip. Returns the line as text
    and no plot.
    """
    from harness import time_thunk

    shape = (256, 512) if quick else (1024, 512)
    if not softgrad.kernels.enabled():
        return f"skipped: {softgrad.kernels.status()['reason']}", None
    fill = _streamed_fill()
    # not from softgrad's pool, which the Jacobian's output comes from
    raw = np.empty(shape[0] * shape[1] * shape[1] * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + raw.size - 64].view(np.float32).reshape(shape[0] * shape[1], shape[1])
    y = softgrad.softmax(_data(shape)[0])
    runs = 3 if quick else 7
    filled = time_thunk(lambda: fill(out, softgrad.kernels._bands(out.shape[0])), runs=runs, warmup=1, memory=False)
    jacobian = time_thunk(lambda: softgrad.softmax_jacobian(y), runs=runs, warmup=1, memory=False)
    return (
        f"softmax_jacobian {shape[0]}x{shape[1]}: {jacobian.median_ms:.1f} ms; a streamed fill of its "
        f"{out.nbytes / 2**20:.0f} MiB output: {filled.median_ms:.1f} ms "
        f"({out.nbytes / filled.median_ms / 1e6:.1f} GB/s); jacobian / fill: {jacobian.median_ms / filled.median_ms:.2f}"
    ), None


def _streamed_fill():
    from numba import njit, prange

    from softgrad.kernels._primitives import store_fence, stream_block
    from softgrad.kernels._rows import BLOCK, band_rows

    @njit(parallel=True)
    def fill(out, n_bands):
        for band in prange(n_bands):
            block = np.zeros(BLOCK, out.dtype)
            first, stop = band_rows(band, n_bands, out.shape[0])
            for i in range(first, stop):
                for b in range(out.shape[1] // BLOCK):
                    stream_block(block, out[i], b * BLOCK, BLOCK)
            store_fence()

    return fill


# -- softgrad's TensorFlow path against TensorFlow's built-ins ----------------


def _tf_path_step(op, x, labels, dy, jit, use_softgrad):
    """Forward and backward of ``op`` on TF tensors, softgrad's or TF's own."""
    import tensorflow as tf

    xt, yt, dyt = tf.constant(x), tf.constant(labels), tf.constant(dy)
    builtins = {
        "cross_entropy": lambda xt: tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yt, logits=xt)),
        "softmax": tf.nn.softmax,
        "log_softmax": tf.nn.log_softmax,
    }
    ours = {
        "cross_entropy": lambda xt: softgrad.cross_entropy(xt, yt),
        "softmax": softgrad.softmax,
        "log_softmax": softgrad.log_softmax,
    }
    forward = (ours if use_softgrad else builtins)[op]
    cotangent = None if op == "cross_entropy" else dyt

    @tf.function(jit_compile=jit)
    def step(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            out = forward(xt)
        return out, tape.gradient(out, xt, output_gradients=cotangent)

    return lambda: [t.numpy() for t in step(xt)]


def tf_path_case(shape, jit, op="cross_entropy"):
    """softgrad on TF tensors against TF's built-in for the same op, forward
    and backward, under tf.function or XLA."""
    x, labels, dy = _data(shape)
    mode = "XLA" if jit else "tf.function"
    impls = {
        "softgrad": lambda: _tf_path_step(op, x, labels, dy, jit, True),
        "tf": lambda: _tf_path_step(op, x, labels, dy, jit, False),
    }
    return Case(f"TF path: {op} fwd+bwd ({mode})", shape, "float32", impls, numpy_buffers=False, turns=21)


def cases(quick):
    big = (1024, 32768)
    return [
        cross_entropy_case(big),
        softmax_vjp_case(big),
        jacobian_case((1024, 512)),
        cross_entropy_case((65536, 10)),
        softmax_vjp_case((65536, 10)),
        cross_entropy_case((1000, 50257), tf=not quick, torch=not quick),
        softmax_vjp_case((1000, 50257), tf=not quick, torch=not quick),
    ] + [
        tf_path_case((256, 32768), jit, op)
        for op in ("cross_entropy", "softmax", "log_softmax")
        for jit in (False, True)
    ]
