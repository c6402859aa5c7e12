"""``softgrad train``: a digits classifier trained with hand-written backprop."""

import argparse
import textwrap
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from softgrad.cli import _mlp
from softgrad.cli._util import CliError, import_tensorflow, output_dir, pyplot, require
from softgrad.cli._verify import GradientCheck

_EPILOG = """\
The data are scikit-learn's bundled handwritten digits (1797 8×8 images, no
download); 20% are held out for the test accuracy. The backward pass is written
by hand from softgrad's primitives: cross_entropy_with_grad gives (p − y)/N at
the output, and Adam is written by hand too.

examples:
  softgrad train
  softgrad train --backend tensorflow --verify
  softgrad train --epochs 60 --hidden 128 --out runs/wide
"""


@dataclass
class Config:
    backend: str = "numpy"
    epochs: int = 30
    hidden: int = 64
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.003
    verify: bool = False


@dataclass
class Result:
    config: Config
    test_accuracy: float
    seconds: float
    history: dict = field(default_factory=lambda: {"loss": [], "train_accuracy": [],
                                                   "test_accuracy": []})
    verify: str = ""


def register(commands):
    parser = commands.add_parser(
        "train",
        help="train a digits classifier with hand-written backprop",
        description=textwrap.fill("Train a one-hidden-layer softmax classifier on the digits data set "
        "with backprop written by hand from softgrad's primitives."),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Config()
    parser.add_argument("--backend", choices=("numpy", "tensorflow"), default=defaults.backend,
                        help="array library for the whole run (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, metavar="H",
                        help="hidden units (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S",
                        help="seed of the split, the weights and the batches (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="check every step's gradients against tf.GradientTape autodiff; "
                        "exit 1 on a mismatch")
    parser.add_argument("--out", default="softgrad-train", metavar="DIR",
                        help="folder for training.png and metrics.json (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args):
    for name in ("epochs", "hidden"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}")
    config = Config(backend=args.backend, epochs=args.epochs, hidden=args.hidden,
                    seed=args.seed, verify=args.verify)
    folder = output_dir(args.out)
    result = train(config)
    print(f"test accuracy: {result.test_accuracy:.3f}")
    print(f"trained in {result.seconds:.1f} s ({config.backend}, {config.epochs} epochs, "
          f"{config.hidden} hidden units)")
    if result.verify:
        print(result.verify)
    picture, metrics = save(result, folder)
    print(f"wrote {picture} and {metrics}")
    return 0


def load_digits(seed):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], 20% held out."""
    datasets = require("sklearn.datasets", "cli")
    split = require("sklearn.model_selection", "cli").train_test_split
    digits = datasets.load_digits()
    x = digits.data.astype(np.float32) / 16.0
    return split(x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)


def train(config):
    """Train with hand-written backprop; returns a Result."""
    tqdm = require("tqdm", "cli").tqdm
    x_train, x_test, y_train, y_test = load_digits(config.seed)
    tensorflow = config.backend == "tensorflow"
    ops = _mlp.TensorFlowOps(import_tensorflow()) if tensorflow else _mlp.NumpyOps()
    check = GradientCheck(import_tensorflow()) if config.verify else None
    rng = np.random.default_rng(config.seed)
    params = _mlp.init_params(ops, rng, x_train.shape[1], config.hidden, 10)
    adam = _mlp.Adam(ops, params, config.lr)
    data = (ops.floats(x_train), ops.ints(y_train), ops.floats(x_test))
    result = Result(config, 0.0, 0.0)
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=f"training ({config.backend})", unit="epoch")
    for _ in bar:
        params, loss, accuracy = _epoch(ops, params, adam, data, y_train, rng, config, check)
        test_accuracy = _accuracy(ops, params, data[2], y_test)
        for key, value in zip(result.history, (loss, accuracy, test_accuracy)):
            result.history[key].append(value)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", test_acc=f"{test_accuracy:.3f}")
    result.seconds = time.perf_counter() - start
    result.test_accuracy = result.history["test_accuracy"][-1]
    result.verify = check.summary() if check else ""
    return result


def _epoch(ops, params, adam, data, y_train, rng, config, check):
    """One pass in shuffled mini-batches: (params, mean loss, training accuracy)."""
    x, labels, _ = data
    order = rng.permutation(len(y_train))
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        rows = order[start:start + config.batch_size]
        xb, yb = ops.take(x, rows), ops.take(labels, rows)
        loss, logits, grads = _mlp.backprop(ops, params, xb, yb)
        if check:
            check(params, ops.numpy(xb), ops.numpy(yb), {k: ops.numpy(g) for k, g in grads.items()})
        params = adam.step(params, grads)
        total_loss += float(loss) * len(rows)
        correct += int((ops.numpy(logits).argmax(axis=1) == y_train[rows]).sum())
    return params, total_loss / len(order), correct / len(order)


def _accuracy(ops, params, x, labels):
    _, logits = _mlp.forward(ops, params, x)
    return float((ops.numpy(logits).argmax(axis=1) == labels).mean())


def save(result, folder):
    """Write training.png and metrics.json; returns their paths."""
    picture, metrics = folder / "training.png", folder / "metrics.json"
    title = f"Digits MLP, hand-written backprop ({result.config.backend})"
    plot_history(result.history, picture, title)
    summary = {"test_accuracy": result.test_accuracy, "train_seconds": round(result.seconds, 3),
               "config": asdict(result.config), "history": result.history,
               "verify": result.verify or None}
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    return picture, metrics


def plot_history(history, path, title):
    plt = pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    left.plot(epochs, history["loss"], marker="o", markersize=3)
    left.set(title="Training loss (mean cross-entropy)", xlabel="epoch", ylabel="loss", yscale="log")
    right.plot(epochs, history["train_accuracy"], marker="o", markersize=3,
               label="training batches, during the epoch")
    right.plot(epochs, history["test_accuracy"], marker="s", markersize=3, label="held-out 20%")
    right.set(title="Accuracy", xlabel="epoch", ylabel="fraction correct")
    right.legend(loc="lower right")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
