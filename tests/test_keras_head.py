"""softgrad.keras.LinearCrossEntropyHead: logits, loss, model.fit, MirroredStrategy."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import softgrad as sg

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keras(tf):
    return pytest.importorskip("keras")


def _head(keras, **options):
    from softgrad.keras import LinearCrossEntropyHead

    head = LinearCrossEntropyHead(7, bias_initializer="random_normal", **options)
    head.build((None, 4))
    return head


def test_logits_and_top_k(keras):
    head = _head(keras, softcap=2.0)
    h = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    u = h @ head.kernel.numpy() + head.bias.numpy()
    capped = 2.0 * np.tanh(u / 2.0)
    np.testing.assert_allclose(head(h), capped, rtol=1e-5, atol=1e-6)
    values, indices = head.top_k(h, 2)
    np.testing.assert_array_equal(indices, np.argsort(-u, axis=-1)[:, :2])
    np.testing.assert_allclose(values, -np.sort(-capped, axis=-1)[:, :2], rtol=1e-5, atol=1e-6)


def test_loss_is_linear_cross_entropy_and_is_added(keras):
    head = _head(keras, chunk_size=3, label_smoothing=0.1, ignore_index=-1)
    h = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    t = np.array([0, 6, -1, 3, 3])
    loss = head(h, t)
    expected = sg.linear_cross_entropy(h, head.kernel.numpy(), t, bias=head.bias.numpy(), label_smoothing=0.1,
                                       ignore_index=-1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert len(head.losses) == 1
    np.testing.assert_allclose(head.losses[0], expected, rtol=1e-5)


def test_config_round_trip(keras):
    from softgrad.keras import LinearCrossEntropyHead

    head = _head(keras, use_bias=False, softcap=30.0, z_loss=1e-4)
    clone = LinearCrossEntropyHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_fit_learns_a_lookup(keras):
    """Each label is a fixed function of the input token: a model that fits must get the loss well below log V."""
    from softgrad.keras import LinearCrossEntropyHead

    keras.utils.set_random_seed(0)
    vocab = 50
    tokens = keras.Input((None,), dtype="int32")
    labels = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(vocab, 16)(tokens)
    model = keras.Model([tokens, labels], LinearCrossEntropyHead(vocab, chunk_size=16)(hidden, labels))
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    x = np.random.default_rng(2).integers(0, vocab, size=(64, 8))
    history = model.fit((x, (7 * x + 3) % vocab), epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.2 * np.log(vocab)


MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from softgrad.keras import LinearCrossEntropyHead

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(8, 6, 5)).astype(np.float32)
    labels = rng.integers(0, 37, size=(8, 6))

    def one_step(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            h = keras.Input((6, 5))
            t = keras.Input((6,), dtype="int32")
            head = LinearCrossEntropyHead(37, chunk_size=10, softcap=5.0, z_loss=1e-3,
                                          bias_initializer="random_normal")
            model = keras.Model([h, t], head(h, t))
            model.compile(optimizer=keras.optimizers.SGD(1.0))
        before = [w.numpy() for w in (head.kernel, head.bias)]
        loss = model.fit((hidden, labels), batch_size=8, epochs=1, shuffle=False, verbose=0).history["loss"][0]
        grads = [(b - w.numpy()).tolist() for b, w in zip(before, (head.kernel, head.bias))]
        return {"loss": loss, "grads": grads}

    mirrored = tf.distribute.MirroredStrategy()
    assert mirrored.num_replicas_in_sync == 2
    json.dump({"one": one_step(tf.distribute.get_strategy()), "mirrored": one_step(mirrored)}, sys.stdout)
    """
)


def _run(code):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_mirrored_strategy_gives_the_same_loss_and_gradients(keras):
    """Two logical CPU devices must be configured before TensorFlow starts: a subprocess."""
    import json

    out = json.loads(_run(MIRRORED).strip().splitlines()[-1])
    one, mirrored = out["one"], out["mirrored"]
    np.testing.assert_allclose(mirrored["loss"], one["loss"], rtol=1e-6)
    for a, e in zip(mirrored["grads"], one["grads"]):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    assert np.abs(one["grads"][0]).max() > 1e-3


@pytest.mark.slow
def test_char_lm_example_trains_on_one_device_and_mirrored(keras):
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "examples")!r})
        import char_lm
        char_lm.split_devices(2)
        one, predictor, alphabet = char_lm.train(epochs=3)
        two, _, _ = char_lm.train(epochs=3, replicas=2)
        print(one[0], one[-1], two[0], two[-1])
        print(char_lm.generate(predictor, alphabet, "The ", length=5))
        """
    )
    lines = _run(code).strip().splitlines()
    first, last, first_mirrored, last_mirrored = map(float, lines[-2].split())
    assert last < first < np.log(60)
    np.testing.assert_allclose([first_mirrored, last_mirrored], [first, last], rtol=1e-4)
    assert lines[-1].startswith("The ") and len(lines[-1]) == 9
