"""``softgrad info``: versions, importable backends, the active compute path."""

import argparse
import textwrap
import importlib
import platform
from importlib import metadata

import numpy as np

from softgrad import __version__
from softgrad.cli._util import CliError, import_tensorflow

_OPTIONAL = ("numba", "matplotlib", "scikit-learn", "tqdm")


def register(commands):
    parser = commands.add_parser(
        "info",
        help="print versions, backends and compute paths",
        description=textwrap.fill("Print the versions of softgrad and its dependencies, which "
        "backends can be imported, and which compute path the NumPy backend uses."),
        epilog="example:\n  softgrad info",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)


def run(args):
    print(f"softgrad {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"numpy {np.__version__}")
    for name in _OPTIONAL:
        print(f"{name} {_installed_version(name)}")
    print("backends:")
    print("  numpy: yes")
    print(f"  tensorflow: {_tensorflow_status()}")
    print(f"compute path: {_compute_path()}")
    return 0


def _installed_version(distribution):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tensorflow_status():
    try:
        tf = import_tensorflow()
    except CliError:
        return "no (not installed)"
    except Exception as err:  # a broken install is worth reporting, not crashing on
        return f"no (import failed: {type(err).__name__}: {err})"
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices())
    return f"yes, tensorflow {tf.__version__} on {devices}"


def _compute_path():
    try:
        kernels = importlib.import_module("softgrad.kernels")
        state = kernels.status()
    except (ImportError, AttributeError):
        return "pure NumPy (softgrad.kernels is not available in this installation)"
    return f"{state['path']} ({state['reason']})"
