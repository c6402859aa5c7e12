"""The ``softgrad`` command: a guided demo, a derivative checker, a training run.

Each subcommand lives in its own module with a ``register(subparsers)`` that
adds its parser; the parser's ``run`` default does the work and returns the
exit status. Heavy imports (TensorFlow, matplotlib, scikit-learn) happen
inside the commands, so ``softgrad --help`` stays instant.
"""

import argparse
import textwrap
import sys

from softgrad import __version__
from softgrad.cli import check, demo, info, train
from softgrad.cli._util import CliError

_EPILOG = """\
examples:
  softgrad demo                                 the guided tour (start here)
  softgrad check my_grad.py:softmax_backward    is my derivative right?
  softgrad train --backend tensorflow --verify  backprop by hand, checked
  softgrad info                                 versions and compute paths
  softgrad bench --quick                        time softgrad against the rest

run 'softgrad COMMAND --help' for a command's options and examples.
"""


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args)
    except CliError as err:
        print(f"softgrad {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"softgrad {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser():
    parser = argparse.ArgumentParser(
        prog="softgrad",
        description="Softmax derivatives, explained and checked.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"softgrad {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, check, train, info):
        module.register(commands)
    _register_bench(commands)
    return parser


def _register_bench(commands):
    parser = commands.add_parser(
        "bench",
        help="benchmark softgrad against NumPy, TensorFlow and PyTorch",
        description=textwrap.fill("Time softgrad's kernels against naive NumPy, TensorFlow and "
        "PyTorch (if installed) and print the table of ratios."),
        epilog="examples:\n  softgrad bench --quick\n  softgrad bench --out results/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, a few runs")
    parser.add_argument("--out", default="softgrad-bench", metavar="DIR",
                        help="folder for the CSV and plots (default: %(default)s)")
    parser.set_defaults(run=_run_bench)


def _run_bench(args):
    try:
        from softgrad.cli.bench import run_bench
    except ImportError as err:
        raise CliError(f"the benchmarks are not available in this installation ({err})") from None
    return run_bench(args.quick, args.out)
