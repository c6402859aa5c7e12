"""A character-level next-token model trained through LinearCrossEntropyHead.

The head's loss is softgrad.linear_cross_entropy, which never builds the
(batch, length, vocabulary) logits; with a vocabulary of a few dozen
characters that saves nothing, but the same model with a 100k-token
vocabulary is where it matters. The vocabulary is chunked anyway
(--chunk-size) so that the example exercises the chunked path.

    python examples/char_lm.py                 # one device
    python examples/char_lm.py --replicas 2    # MirroredStrategy, 2 CPU devices

The text is examples/data/lighthouse.txt, written for this project.
"""

import argparse
import os
import pathlib

import numpy as np

TEXT = pathlib.Path(__file__).with_name("data") / "lighthouse.txt"


def split_devices(replicas):
    """Split the CPU into logical devices; must run before TensorFlow starts."""
    import tensorflow as tf

    if replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


def load(seq_len):
    """(inputs, targets, alphabet): every window of seq_len characters and its shift by one."""
    text = TEXT.read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    ids = np.array([alphabet.index(c) for c in text], dtype=np.int32)
    starts = np.arange(0, len(ids) - seq_len - 1, seq_len // 2)
    windows = np.stack([ids[s : s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:], alphabet


def build(vocab_size, width=64, chunk_size=16):
    """``(trainer, predictor)``: the first adds the loss, the second returns logits."""
    import keras

    from softgrad.keras import LinearCrossEntropyHead

    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    labels = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocab_size, width)(tokens)
    for dilation in (1, 2, 4):
        # Causal convolutions: each position sees only the characters before it.
        x = x + keras.layers.Conv1D(width, 3, padding="causal", dilation_rate=dilation, activation="gelu")(x)
    head = LinearCrossEntropyHead(vocab_size, chunk_size=chunk_size, softcap=30.0)
    trainer = keras.Model([tokens, labels], head(x, labels))
    predictor = keras.Model(tokens, head(x))
    return trainer, predictor


def train(*, epochs=20, seq_len=64, batch_size=32, replicas=1, learning_rate=3e-3):
    """Train; returns (per-epoch losses, predictor, alphabet)."""
    import keras
    import tensorflow as tf

    inputs, targets, alphabet = load(seq_len)
    strategy = tf.distribute.MirroredStrategy() if replicas > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        trainer, predictor = build(len(alphabet))
        trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = trainer.fit((inputs, targets), batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"], predictor, alphabet


def generate(predictor, alphabet, prompt, length=80):
    """Greedy continuation of prompt (characters outside the text's alphabet are dropped)."""
    ids = [alphabet.index(c) for c in prompt if c in alphabet]
    for _ in range(length):
        # A direct call, not predict(): predict would split one prompt across replicas.
        logits = np.asarray(predictor(np.array([ids], dtype=np.int32)))
        ids.append(int(np.argmax(logits[0, -1])))
    return "".join(alphabet[i] for i in ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    split_devices(args.replicas)
    losses, predictor, alphabet = train(epochs=args.epochs, replicas=args.replicas)
    print(f"loss per character: {losses[0]:.3f} after epoch 1, {losses[-1]:.3f} after epoch {len(losses)}")
    print(generate(predictor, alphabet, "The keeper "))


if __name__ == "__main__":
    main()
