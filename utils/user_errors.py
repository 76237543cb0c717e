"""One-line messages for user mistakes, tracebacks for bugs (eval.py, predict.py).

A stand-in, kept to this one small module so that it is easy to replace by a shared command-line
helper: the user's mistakes (a bad flag, bad data, a busy or occupied folder, a full disk) are
printed as `error: ...` and exit with status 1; anything else is a bug and keeps its traceback.
"""
import sys

from datasets.brats import DataError
from utils.io import DiskFullError
from utils.lock import LockError


class UsageError(ValueError):
    """A bad flag, flag combination or checkpoint: the message says what to change."""


USER_ERRORS = (UsageError, DataError, LockError, DiskFullError)


def run_main(main, argv=None):
    """Call main(argv); a user error becomes one line on stderr and exit status 1."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
