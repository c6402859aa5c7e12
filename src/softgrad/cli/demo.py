"""``softgrad demo``: the guided tour, end to end, offline, in well under a minute."""

import argparse
import textwrap
import time
from pathlib import Path

import numpy as np

import softgrad as sg
from softgrad.cli import train as train_command
from softgrad.cli._usercode import load_function
from softgrad.cli._util import import_tensorflow, output_dir, pyplot
from softgrad.cli.check import check_function

EXAMPLES = Path(__file__).parent / "examples"
_MISTAKES = (
    ("jacobian_column_sum.py", "softmax_derivative"),
    ("jacobian_column_sum_tf.py", "softmax_grad"),
    ("diagonal_only.py", "softmax_backward"),
    ("no_max_shift.py", "softmax_backward"),
    ("global_max.py", "softmax_backward"),
    ("loop_jacobian.py", "softmax_jacobian"),
    ("cross_entropy_no_mean.py", "cross_entropy_grad"),
    ("correct_vjp.py", "softmax_backward"),
)
_LOGITS = np.array([[2.0, 1.0, 0.1, -1.0], [0.5, 0.5, 3.0, -2.0]])
_UPSTREAM = np.array([[1.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.5, 1.0]])
_LABELS = np.array([0, 2])


def register(commands):
    parser = commands.add_parser(
        "demo",
        help="the guided tour: derivatives, classic mistakes, a training run",
        description=textwrap.fill(
            "Show softmax, its Jacobian, its VJP and the cross-entropy gradient on NumPy "
            "and TensorFlow, each checked against tf.GradientTape autodiff; run the classic "
            "hand-written mistakes through 'softgrad check'; train a small classifier. "
            "Needs no network; pictures go to --out."),
        epilog="examples:\n  softgrad demo\n  softgrad demo --out /tmp/softgrad-pictures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="softgrad-demo", metavar="DIR",
                        help="folder for the pictures (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args):
    start = time.perf_counter()
    folder = output_dir(args.out)
    tf = import_tensorflow()
    np.set_printoptions(precision=4, suppress=True, floatmode="fixed")
    _derivatives(tf, folder / "jacobian.png")
    _mistakes()
    training = _training(folder / "training.png")
    _heading("Done")
    print(f"pictures: {folder / 'jacobian.png'} and {training}")
    print(f"finished in {time.perf_counter() - start:.1f} s")
    return 0


def _heading(text):
    print(f"\n{text}\n{'─' * len(text)}")


def _derivatives(tf, picture):
    _heading("1. Softmax and its derivatives, NumPy and TensorFlow, against tf.GradientTape")
    x_tf, dy_tf = tf.constant(_LOGITS), tf.constant(_UPSTREAM)
    print(f"logits x (2 rows, 4 classes):\n{_LOGITS}")
    print(f"upstream gradient dy, for the VJP:\n{_UPSTREAM}\nlabels, for the cross-entropy: {_LABELS}")
    reference = _autodiff(tf, x_tf, dy_tf)
    shown = (
        ("softmax s = softgrad.softmax(x); each row sums to 1", "softmax",
         lambda x, dy: sg.softmax(x)),
        ("Jacobian of row 0, J = diag(s) − s sᵀ = softgrad.softmax_jacobian(x)", "jacobian",
         lambda x, dy: sg.softmax_jacobian(x)),
        ("VJP Jᵀ·dy = softgrad.softmax_vjp(s, dy), what backprop needs", "vjp",
         lambda x, dy: sg.softmax_vjp(sg.softmax(x), dy)),
        ("cross-entropy gradient (p − y)/N = softgrad.cross_entropy_with_grad(x, labels)[1]",
         "ce", lambda x, dy: sg.cross_entropy_with_grad(x, _LABELS)[1]),
    )
    for title, key, compute in shown:
        ours_np, ours_tf = compute(_LOGITS, _UPSTREAM), compute(x_tf, dy_tf).numpy()
        print(f"\n{title}:\n{ours_np[0] if key == 'jacobian' else ours_np}")
        print(f"  max |softgrad − autodiff|: NumPy {_error(ours_np, reference[key])}, "
              f"TensorFlow {_error(ours_tf, reference[key])}")
    jacobian = sg.softmax_jacobian(_LOGITS)
    column_sums = jacobian.sum(axis=1)
    print(f"\nthe classic mistake, J.sum(axis=1), is 0 up to rounding (largest entry "
          f"{np.abs(column_sums).max():.1e}): every column of J sums to 0")
    _jacobian_heatmap(jacobian[0], _LOGITS[0], picture)
    print(f"heatmap of J: {picture}")


def _autodiff(tf, x, dy):
    """The same quantities from plain TensorFlow ops and tf.GradientTape."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        s = tf.nn.softmax(x)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(_LABELS, x))
    return {
        "softmax": s.numpy(),
        "jacobian": tape.batch_jacobian(s, x).numpy(),
        "vjp": tape.gradient(s, x, output_gradients=dy).numpy(),
        "ce": tape.gradient(loss, x).numpy(),
    }


def _error(ours, reference):
    return f"{np.max(np.abs(np.asarray(ours) - reference)):.1e}"


def _jacobian_heatmap(jacobian, logits, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout="constrained")
    limit = np.abs(jacobian).max()
    image = ax.imshow(jacobian, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (i, j), value in np.ndenumerate(jacobian):
        # white on the darkest cells, black elsewhere, so every number stays legible
        colour = "white" if abs(value) > 0.6 * limit else "black"
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=10, color=colour)
    classes = range(len(logits))
    ax.set(xticks=classes, yticks=classes, xlabel=r"$j$ (logit $x_j$)",
           ylabel=r"$i$ (probability $s_i$)",
           title="Softmax Jacobian $J = \\mathrm{diag}(s) - s s^T$\n"
           f"logits x = {np.array2string(logits, precision=1, separator=', ')}")
    fig.colorbar(image, ax=ax, label=r"$\partial s_i / \partial x_j$  (rows and columns sum to 0)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mistakes():
    _heading("2. Classic hand-written mistakes, through 'softgrad check'")
    for filename, function_name in _MISTAKES:
        target = f"{EXAMPLES / filename}:{function_name}"
        function, module, path = load_function(target)
        report = check_function(function, module, path)
        print(f"{filename + ':' + function_name:<46} {report.verdict.upper():<8} {report.headline}")
        if filename == "jacobian_column_sum.py":
            print(textwrap.fill(report.why, 88, initial_indent="    ", subsequent_indent="    "))
    print(f"\nthe files are in {EXAMPLES}; for the full report, try:\n"
          f"  softgrad check {EXAMPLES / 'diagonal_only.py'}:softmax_backward")


def _training(picture):
    _heading("3. A short training run: digits, hand-written backprop (softgrad train)")
    config = train_command.Config(epochs=8)
    result = train_command.train(config)
    print(f"test accuracy: {result.test_accuracy:.3f} after {config.epochs} epochs "
          f"in {result.seconds:.1f} s (the full run: softgrad train)")
    train_command.plot_history(result.history, picture, "Digits MLP, hand-written backprop (numpy)")
    return picture
