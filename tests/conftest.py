"""Shared fixtures: TensorFlow execution modes and hypothesis profiles.

Profiles (choose with HYPOTHESIS_PROFILE=<name>): "ci" is the default and
keeps the whole suite to a few minutes on two cores; "thorough" is for
hunting bugs locally.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# TensorFlow's C++ start-up chatter hides test output; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _to_numpy(result):
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)


def _runner(mode):
    import tensorflow as tf

    def run(fn, *args):
        """fn(*args) in this mode, with the results as NumPy arrays.

        args are converted to tensors so that tf.function traces them as
        inputs (not constants); options stay in fn's closure.
        """
        tensors = [tf.convert_to_tensor(a) if isinstance(a, np.ndarray) else a for a in args]
        if mode == "eager":
            return _to_numpy(fn(*tensors))
        compiled = tf.function(fn, jit_compile=(mode == "xla"), autograph=False)
        return _to_numpy(compiled(*tensors))

    run.mode = mode
    return run


@pytest.fixture(scope="session")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def tf_runner(tf):
    """The factory behind tf_run, for tests that choose their own modes."""
    return _runner


@pytest.fixture(scope="session", params=["eager", "function", "xla"])
def tf_run(request, tf):
    """Runs a TF computation eagerly, under tf.function, and under XLA."""
    return _runner(request.param)


@pytest.fixture(scope="session", params=["eager", "function"])
def tf_run_graph(request, tf):
    """Eager and tf.function only, for what XLA cannot express (assertions)."""
    return _runner(request.param)
