"""A Keras 3 output layer whose loss never builds the (N, V) logits.

``LinearCrossEntropyHead`` owns a Dense-style (D, V) kernel and optional
bias. Called with ``(hidden, labels)`` it adds
``softgrad.linear_cross_entropy`` of them as the layer's loss (so
``model.compile(optimizer)`` and ``model.fit`` train it) and returns that
loss; called with ``hidden`` alone it returns the logits, and ``top_k``
gives the best classes. It needs the TensorFlow backend of Keras.

Keras is imported here, when this module is imported: ``import softgrad``
does not import it. Under ``tf.distribute`` each replica adds the mean over
its own examples, and Keras divides additional losses by the number of
replicas, so the gradients equal those of one device whenever the replicas
hold equally many counted examples.
"""

import keras
from keras import ops

from .linear_cross_entropy import linear_cross_entropy

__all__ = ["LinearCrossEntropyHead"]


@keras.saving.register_keras_serializable(package="softgrad")
class LinearCrossEntropyHead(keras.layers.Layer):
    """The last layer of a language model: logits ``h @ kernel + bias`` and their loss.

    Args:
        vocab_size: V, the number of classes.
        use_bias: whether the head has a (V,) bias.
        chunk_size, softcap, ignore_index, label_smoothing, z_loss: passed to
            :func:`softgrad.linear_cross_entropy` (reduction is "mean").
        kernel_initializer, bias_initializer: as for ``keras.layers.Dense``.

    Call:
        ``head(hidden, labels)``: adds the mean loss over the labelled
        positions (hidden of shape (..., D), integer labels of shape (...))
        and returns it. ``head(hidden)``: the (..., V) logits, soft-capped
        when ``softcap`` is set.
    """

    def __init__(
        self,
        vocab_size,
        *,
        use_bias=True,
        chunk_size=None,
        softcap=None,
        ignore_index=None,
        label_smoothing=0.0,
        z_loss=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"LinearCrossEntropyHead needs the TensorFlow backend of Keras, got "
                f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow"
            )
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.use_bias = use_bias
        self.loss_options = {
            "chunk_size": chunk_size,
            "softcap": softcap,
            "ignore_index": ignore_index,
            "label_smoothing": label_smoothing,
            "z_loss": z_loss,
        }
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, hidden_shape, labels_shape=None):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden_shape[-1], self.vocab_size),
            initializer=self.kernel_initializer,
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.vocab_size,), initializer=self.bias_initializer)
            if self.use_bias
            else None
        )

    def call(self, hidden, labels=None):
        if labels is None:
            return self.logits(hidden)
        loss = linear_cross_entropy(
            hidden,
            self.kernel.value,
            ops.cast(labels, "int32"),
            bias=None if self.bias is None else self.bias.value,
            **self.loss_options,
        )
        self.add_loss(loss)
        return loss

    def logits(self, hidden):
        """The full (..., V) logits: for prediction, not for the loss."""
        x = ops.matmul(hidden, self.kernel)
        if self.bias is not None:
            x = x + self.bias
        cap = self.loss_options["softcap"]
        return x if cap is None else cap * ops.tanh(x / cap)

    def top_k(self, hidden, k=1):
        """``(values, indices)`` of the k largest logits per position."""
        return ops.top_k(self.logits(hidden), k)

    def compute_output_spec(self, hidden, labels=None):
        if labels is None:
            return keras.KerasTensor(hidden.shape[:-1] + (self.vocab_size,), dtype=self.compute_dtype)
        return keras.KerasTensor((), dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "use_bias": self.use_bias,
            **self.loss_options,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
