"""Command-line helpers shared by the scripts: value types, error reporting and stop signals."""
import argparse
import os
import signal
import sys
import threading
from fractions import Fraction

from datasets.brats import DataError
from models.lckd import MULTIPLES_RULE, PATCH_MULTIPLES
from utils.distributed import (DeviceError, MainRankFailed, PeerFailed, RankTimeoutError,
                               launched_rank)
from utils.io import DiskFullError, NotWritableError, is_disk_full
from utils.lock import LockError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors are one line as every other mistake a user makes (`error: ...`,
    exit status 2) instead of the usage block that buries the message. Flags are taken only by
    their whole names: argparse would read eval.py's `--input` given to predict.py as
    `--input_size`, and a misspelt prefix as whichever flag it starts."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def str2bool(text):
    """Published boolean flags take a value: `--weight_std True`, `--random_mirror=False`.

    Accepts (any case, surrounding spaces ignored) true/t/yes/y/1 and false/f/no/n/0, or a
    bool (a default from a JSON config). Anything else is an argparse error.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True or False), got {text!r}")


PUBLISHED_INPUT_SIZE = "80,160,160"


def window_size(text):
    """'80,160,160' -> (80, 160, 160), the patch / sliding-window size of train.py and eval.py;
    D a multiple of 16, H and W of 32."""
    try:
        window = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        window = ()
    if len(window) != 3 or min(window) < 1:
        raise argparse.ArgumentTypeError(f"expected D,H,W such as {PUBLISHED_INPUT_SIZE}, got {text!r}")
    if any(w % m for w, m in zip(window, PATCH_MULTIPLES)):
        raise argparse.ArgumentTypeError(f"{text}: {MULTIPLES_RULE}")
    return window


def overlap_fraction(text):
    """'1/3' or '0.333' -> float in [0, 1)."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction such as 1/3 or 0.5, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def int_at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


class UsageError(ValueError):
    """A bad flag value or combination, found before anything is written (exit status 2, as
    argparse's own errors)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, torchrun stopping its processes), raised in the main
    thread like Ctrl-C's KeyboardInterrupt so that the run unwinds the same way: temporary files
    removed, locks released, exit 143 with one line."""


def _raise_terminated(signum, frame):
    # A repeated SIGTERM is the same request (a scheduler signals every process of the job,
    # run.sh and torchrun pass it on): it must not cut short the unwinding of the first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


# Mistakes in the data or outside conditions every script reports in one line.
USER_ERRORS = (DataError, LockError, DiskFullError, NotWritableError, DeviceError, PeerFailed,
               RankTimeoutError)
# A stop signal's exit status is 128 + the signal, the shell's convention (train.py's loop too).
TERMINATED, INTERRUPTED = 128 + signal.SIGTERM, 128 + signal.SIGINT
STOPPED = {TERMINATED: "terminated", INTERRUPTED: "interrupted"}  # what run_cli prints for them


def exit_status(error_type, user_errors=USER_ERRORS):
    """The status run_cli exits with for an error of this class: 143 SIGTERM, 130 Ctrl-C,
    2 a usage error, 1 one of `user_errors`; None for a bug."""
    for types, status in ((Terminated, TERMINATED), (KeyboardInterrupt, INTERRUPTED),
                          (UsageError, 2), (user_errors, 1)):
        if issubclass(error_type, types):
            return status
    return None


def _thread_exception(args):
    """threading.excepthook under run_cli: a full disk in a writer thread (TensorBoard's event
    writer) is raised again in the main thread, which reports it in one line; the thread's own
    traceback would only bury that line."""
    if not is_disk_full(args.exc_value):
        threading.__excepthook__(args)


# How long a stop signal whose exception was lost waits to be sent again (_unraisable_hook):
# long enough for the main thread to leave the code that lost it.
RESEND_S = 0.1


def _unraisable_hook(previous):
    """sys.unraisablehook under run_cli. A stop signal that arrives while the process forks (a
    DataLoader starting its workers) is handled in the first Python code after the fork, an
    at-fork hook (logging's), where its exception can only be printed: the request would be
    lost, and SIGTERM ignored from then on (_raise_terminated). Instead the signal is sent
    again RESEND_S later, to be raised in the script's own code. Other exceptions go to
    `previous`."""
    def hook(args):
        if not isinstance(args.exc_value, KeyboardInterrupt):  # Terminated is one
            previous(args)
            return
        signum = signal.SIGTERM if isinstance(args.exc_value, Terminated) else signal.SIGINT
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, _raise_terminated)
        resend = threading.Timer(RESEND_S, os.kill, (os.getpid(), signum))
        resend.daemon = True
        resend.start()
    return hook


def run_cli(main, user_errors=USER_ERRORS, argv=None):
    """Run a script's main(argv): a user mistake or an outside condition (UsageError, or one of
    `user_errors`) prints one line `error: ...` to stderr and exits 2 (usage) or 1; Ctrl-C
    exits 130 and SIGTERM 143; anything else is a bug and keeps its traceback. Under torchrun,
    the ranks that rank 0's failure stopped (MainRankFailed) exit with its status without a
    word: rank 0 reports it; so it does a stop signal."""
    # Without a handler SIGTERM ends the process on the spot, skipping every `finally`. A
    # handler can only be set from the main thread (a test may call this from another).
    in_main = threading.current_thread() is threading.main_thread()
    previous, thread_hook, unraisable_hook = None, threading.excepthook, sys.unraisablehook
    if in_main:  # the hooks are the process's: set (and restored) by its main thread alone
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        threading.excepthook = _thread_exception
        sys.unraisablehook = _unraisable_hook(unraisable_hook)
    try:
        return main(argv)
    except MainRankFailed as stopped:
        sys.exit(exit_status(stopped.error_type, user_errors) or 1)
    except (KeyboardInterrupt, UsageError, *user_errors) as error:
        status = exit_status(type(error), user_errors)
        # A stop signal reaches every process of a torchrun job (the scheduler's, or torchrun
        # passing its own on): rank 0 says it once.
        if status not in STOPPED or launched_rank() == 0:
            print(STOPPED.get(status, f"error: {error}"), file=sys.stderr)
        sys.exit(status)
    finally:
        if in_main:
            threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
            if previous is not None:  # None: set outside Python
                signal.signal(signal.SIGTERM, previous)
