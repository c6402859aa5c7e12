"""``softgrad bench``: run the benchmark suite of a source checkout.

The benchmarks are not shipped with the package: they live in ``benchmarks/``
next to ``src/`` and need TensorFlow and PyTorch to compare against
(``pip install -e '.[bench]'``).
"""

import sys
from pathlib import Path

from softgrad.cli._util import CliError


def _benchmarks_dir():
    # src/softgrad/cli/bench.py -> the checkout's root is three folders up
    root = Path(__file__).resolve().parents[3]
    folder = root / "benchmarks"
    if not (folder / "suite.py").is_file():
        raise CliError(
            "softgrad bench needs the benchmarks/ folder of a source checkout "
            "(git clone, then pip install -e '.[bench]'); this installation has none"
        )
    return folder


def run_bench(quick: bool, out_dir: str) -> int:
    """Run benchmarks/suite.py: print the table, write the CSV and the scaling plot."""
    folder = str(_benchmarks_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import suite

    return suite.main(quick=quick, out_dir=out_dir)
