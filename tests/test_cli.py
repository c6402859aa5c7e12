"""The ``softgrad`` command, run as a user runs it: in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import softgrad.cli

EXAMPLES = Path(softgrad.cli.__file__).parent / "examples"
ZERO_SUM = "returns zeros because each row of the softmax Jacobian sums to zero"
NEEDS_VJP = "backprop needs Jᵀ·dy (softgrad.softmax_vjp)"


def softgrad_cmd(*args, cwd=None, timeout=180):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "softgrad", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def words(text):
    """The text with line wrapping undone, for phrase checks."""
    return " ".join(text.split())


def assert_one_line_error(result, *phrases):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, result.stderr
    for phrase in phrases:
        assert phrase in error[0]


@pytest.mark.parametrize("command", ["demo", "check", "train", "info", "bench"])
def test_every_subcommand_has_help_with_examples(command):
    result = softgrad_cmd(command, "--help")
    assert result.returncode == 0
    assert "examples" in result.stdout or "example:" in result.stdout


def test_top_level_help_lists_the_subcommands():
    result = softgrad_cmd("--help")
    assert result.returncode == 0
    for command in ("demo", "check", "train", "info", "bench"):
        assert command in result.stdout


def test_console_script_runs():
    script = Path(sys.executable).with_name("softgrad")
    if not script.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    result = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("softgrad ")


def test_info_reports_versions_backends_and_compute_path():
    result = softgrad_cmd("info")
    assert result.returncode == 0, result.stderr
    for field in ("softgrad ", "numpy ", "backends:", "tensorflow: yes", "compute path: "):
        assert field in result.stdout


# --- check --------------------------------------------------------------

EXAMPLE_VERDICTS = [
    ("jacobian_column_sum.py:softmax_derivative", 1, [ZERO_SUM, NEEDS_VJP]),
    ("jacobian_column_sum_tf.py:softmax_grad", 1, [ZERO_SUM, NEEDS_VJP, "framework: tensorflow"]),
    ("diagonal_only.py:softmax_backward", 1, ["it computes the diagonal only"]),
    ("no_max_shift.py:softmax_backward", 1, ["no max shift", "rows 1, 2"]),
    ("global_max.py:softmax_backward", 1, ["one global max", "rows 0, 2"]),
    ("loop_jacobian.py:softmax_jacobian", 0, ["it computes softmax Jacobian", "slower than softgrad"]),
    ("cross_entropy_no_mean.py:cross_entropy_grad", 1, ["p − y, without 1/N"]),
    ("correct_vjp.py:softmax_backward", 0, ["it computes the VJP Jᵀ·dy"]),
]


@pytest.mark.parametrize("target, exit_code, phrases", EXAMPLE_VERDICTS,
                         ids=[t.split(":")[0] for t, _, _ in EXAMPLE_VERDICTS])
def test_check_names_each_example_mistake(target, exit_code, phrases):
    result = softgrad_cmd("check", f"{EXAMPLES / target}")
    assert result.returncode == exit_code, result.stdout + result.stderr
    verdict = "CORRECT" if exit_code == 0 else "WRONG"
    assert f"verdict: {verdict}" in result.stdout
    assert "fix: " in result.stdout
    for phrase in phrases:
        assert phrase in words(result.stdout)


def test_every_shipped_example_is_checked():
    tested = {target.split(":")[0] for target, _, _ in EXAMPLE_VERDICTS}
    assert tested == {p.name for p in EXAMPLES.glob("*.py")}


def test_check_accepts_the_summed_loss_when_asked():
    target = EXAMPLES / "cross_entropy_no_mean.py"
    result = softgrad_cmd("check", f"{target}:cross_entropy_grad", "--reduction", "sum")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent('''
        import numpy as np

        def softmax(x):
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        def loss_and_grad(logits, onehot):
            p = softmax(logits)
            return -np.mean(np.sum(onehot * np.log(p), axis=1)), (p - onehot) / len(p)

        def first_column(x):
            return x[:, 0]

        def unfinished(x, dy):
            return helper(x) * dy

        def helper(x):
            raise NotImplementedError("softmax backward is still to do")

        def mystery(x, b):
            return x

        NOT_A_FUNCTION = 3
    '''))
    return path


def test_check_understands_one_hot_labels_and_a_loss_gradient_pair(user_file):
    result = softgrad_cmd("check", f"{user_file}:loss_and_grad")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kind: labels" in result.stdout


def test_check_reports_a_wrong_shape_without_crashing(user_file):
    result = softgrad_cmd("check", f"{user_file}:first_column")
    assert result.returncode == 1, result.stderr
    assert "matches none of the candidates" in result.stdout


def test_check_shows_a_short_traceback_when_the_function_raises(user_file):
    result = softgrad_cmd("check", f"{user_file}:unfinished")
    assert result.returncode == 2
    assert "unfinished raised" in result.stderr
    assert "NotImplementedError: softmax backward is still to do" in result.stderr
    assert 'raise NotImplementedError("softmax backward is still to do")' in result.stderr
    assert "_checker.py" not in result.stderr and "_usercode.py" not in result.stderr


def test_check_asks_for_kind_when_the_signature_is_ambiguous(user_file):
    assert_one_line_error(softgrad_cmd("check", f"{user_file}:mystery"), "--kind")
    result = softgrad_cmd("check", f"{user_file}:mystery", "--kind", "upstream")
    assert result.returncode == 1


@pytest.mark.parametrize("target, phrase", [
    ("missing.py:f", "no such file"),
    ("{user_file}:nothere", "has no function 'nothere'"),
    ("{user_file}:NOT_A_FUNCTION", "is not a function"),
    ("{user_file}", "expected FILE.py:FUNCTION"),
])
def test_check_usage_problems_are_one_line_and_exit_2(user_file, target, phrase):
    result = softgrad_cmd("check", target.format(user_file=user_file))
    assert_one_line_error(result, phrase)


def test_check_rejects_a_file_that_is_not_python(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("softmax notes")
    assert_one_line_error(softgrad_cmd("check", f"{notes}:f"), "is not a Python file")


def test_check_reports_a_file_that_fails_to_import(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import numpy as np\n\ndef f(x):\n    return x +\n")
    result = softgrad_cmd("check", f"{broken}:f")
    assert result.returncode == 2
    assert "SyntaxError" in result.stderr


# --- train --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
def test_train_verify_passes_on_both_backends(backend, tmp_path):
    result = softgrad_cmd("train", "--backend", backend, "--epochs", "2", "--verify",
                          "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verify: 90 steps, every hand-written gradient within its bound" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["backend"] == backend and len(metrics["history"]["loss"]) == 2
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_verify_fails_loudly_on_a_wrong_gradient():
    tf = pytest.importorskip("tensorflow")
    from softgrad.cli import _mlp
    from softgrad.cli._util import CliError
    from softgrad.cli._verify import GradientCheck

    ops, rng = _mlp.NumpyOps(), np.random.default_rng(0)
    params = _mlp.init_params(ops, rng, 8, 6, 4)
    x, labels = rng.random((5, 8), dtype=np.float32), rng.integers(0, 4, 5)
    _, _, grads = _mlp.backprop(ops, params, x, labels)
    check = GradientCheck(tf)
    check(params, x, labels, grads)
    grads["w2"] = grads["w2"] * 5.0  # the missing-1/N mistake, for a batch of 5
    with pytest.raises(CliError, match="--verify FAILED at step 2: .* of w2") as failure:
        check(params, x, labels, grads)
    assert failure.value.exit_code == 1


def _default_training(backend, tmp_path):
    result = softgrad_cmd("train", "--backend", backend, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((tmp_path / "metrics.json").read_text())
    assert f"test accuracy: {accuracy['test_accuracy']:.3f}" in result.stdout
    assert accuracy["test_accuracy"] >= 0.95
    assert accuracy["train_seconds"] < 60


def test_default_training_reaches_95_percent_numpy(tmp_path):
    _default_training("numpy", tmp_path)


@pytest.mark.slow
def test_default_training_reaches_95_percent_tensorflow(tmp_path):
    _default_training("tensorflow", tmp_path)


@pytest.mark.parametrize("args, phrase", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--hidden", "-3"], "--hidden must be at least 1"),
])
def test_train_rejects_bad_numbers_in_one_line(args, phrase):
    assert_one_line_error(softgrad_cmd("train", *args), phrase)


# --- demo ---------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_pictures(tmp_path):
    result = softgrad_cmd("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "softgrad-demo"
    for picture in ("jacobian.png", "training.png"):
        assert (folder / picture).stat().st_size > 10_000
        assert str(Path("softgrad-demo") / picture) in result.stdout
    assert ZERO_SUM in words(result.stdout)
    assert result.stdout.count("WRONG") == 6 and result.stdout.count("CORRECT") == 2
    assert "max |softgrad − autodiff|" in result.stdout


def test_demo_output_folder_problem_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(softgrad_cmd("demo", "--out", blocker / "sub"), "cannot create output folder")
