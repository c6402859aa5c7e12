"""What every subcommand shares: the user-error type and the optional imports."""

import importlib
import os
from pathlib import Path


class CliError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def require(module, extra):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CliError(
            f"this command needs {module}: pip install 'softgrad[{extra}]'"
        ) from None


def import_tensorflow():
    # TensorFlow's C++ start-up chatter would bury the command's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return require("tensorflow", "tensorflow")


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, never a window."""
    matplotlib = require("matplotlib", "cli")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def output_dir(path):
    """Create the folder that pictures and metrics go to."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create output folder {str(folder)!r}: {err.strerror}") from None
    return folder
