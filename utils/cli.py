"""Command-line helpers shared by the scripts: value types, error reporting and stop signals."""
import argparse
import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from datasets.brats import DataError
from models.lckd import MULTIPLES_RULE, patch_fits
from utils.distributed import (DEVICE_NAMES, DeviceError, MainRankFailed, PeerFailed,
                               RankTimeoutError, launched_rank, named_device)
from utils.io import DiskFullError, NotWritableError, is_disk_full
from utils.lock import LockError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors are one line as every other mistake a user makes (`error: ...`,
    exit status 2) instead of the usage block that buries the message. Flags are taken only by
    their whole names: argparse would read eval.py's `--input` given to predict.py as
    `--input_size`, and a misspelt prefix as whichever flag it starts."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._given = []

    def parse_known_args(self, args=None, namespace=None):
        self._given = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        # argparse says a required flag is missing before it says which flags it does not
        # know: `--out m.nii.gz` would be told '-o/--output is required', not its misspelling
        unknown = [token.split("=")[0] for token in self._given if token.startswith("--")
                   and token.split("=")[0] not in self._option_string_actions]
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def str2bool(text):
    """Published boolean flags take a value: `--weight_std True`, `--random_mirror=False`.

    Accepts (any case, surrounding spaces ignored) true/t/yes/y/1 and false/f/no/n/0.
    Anything else is an argparse error.
    """
    value = text.strip().lower()
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
    if not patch_fits(*window):
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


def unit_fraction(text):
    """'0.1' -> float in [0, 1]: a share or ratio (postprocessing's --min_fraction...)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.1, got {text!r}") from None
    if not 0 <= value <= 1:  # nan too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
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


def device_name(text):
    """An argparse type: a --device name as given, once it is one of DEVICE_NAMES, so that a
    misspelt one ('gpu') is a flag error (exit status 2) as any other; a device named right
    that is not here (no GPU) is found when resolved (DeviceError)."""
    if text != "auto" and named_device(text) is None:
        raise argparse.ArgumentTypeError(f"expected {DEVICE_NAMES}, got {text!r}")
    return text


def path_given(text):
    """An argparse type: a path, not '' (which Path() reads as the current folder: a script
    would silently read or write there)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return Path(text)


class UsageError(ValueError):
    """A bad flag value or combination, found before anything is written (exit status 2, as
    argparse's own errors)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, torchrun stopping its processes), raised in the main
    thread like Ctrl-C's KeyboardInterrupt so that the run unwinds the same way: temporary files
    removed, locks released, exit 143 with one line."""


# run_cli's stop signals (_stop_signal): the process's, so module-level.
_forks = []  # one entry per fork in progress: from its first at-fork hook to its last
_deferred = None  # a stop signal that came meanwhile, sent again after the fork
_stopping = None  # when a stop signal was raised (time.monotonic()): the script is unwinding
_resends = []  # the timers sending deferred signals again, cancelled when run_cli returns
_fork_hooks_registered = False
# How long after a fork a deferred stop signal is sent again: time for the main thread to
# return from the fork's hooks into the script's own code.
RESEND_S = 0.1
# A second SIGINT this soon after the first stop signal is the same request reaching the process
# twice (a sender that signals every process of the job, and run.sh passing it on; Ctrl-C
# pressed twice in a row), not a second Ctrl-C.
SAME_REQUEST_S = 1.0


def _stop_signal(signum, frame):
    """run_cli's handler of SIGTERM and SIGINT: Terminated or KeyboardInterrupt, raised in the
    main thread so that the script unwinds. A repeated SIGTERM is the same request (a scheduler
    signals every process of the job, run.sh and torchrun pass it on; after Ctrl-C, torchrun
    sends SIGTERM), and so is a SIGINT within SAME_REQUEST_S (Ctrl-C pressed twice in a row, a
    sender that signals every process of the job): neither may cut short the unwinding of the
    first. A later Ctrl-C is the user's: it stops the unwinding too. During a fork (a
    DataLoader starting its workers) the signal is handled in an at-fork hook (logging's),
    where an exception is only printed (and logging's lock stays held): it is deferred."""
    global _deferred
    if _forks:
        _deferred = signum
        return
    if _stopping is not None and (signum == signal.SIGTERM
                                  or time.monotonic() - _stopping < SAME_REQUEST_S):
        return
    mark_stopping()
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def mark_stopping():
    """Record that a stop signal is being acted on (also train.py's loop, which handles its
    own): from now on a repeated SIGTERM is ignored, a SIGINT too within SAME_REQUEST_S, and no
    deferred signal is sent again."""
    global _stopping
    _stopping = time.monotonic()


def _resend(signum):
    if _stopping is None:  # another stop already unwinds the script
        os.kill(os.getpid(), signum)


def _after_fork_in_parent():
    """Send the deferred signal again RESEND_S later, from a timer: raised here, it would be
    lost as in any at-fork hook."""
    global _deferred
    while _deferred is not None:  # one that comes while the timer starts is deferred too
        signum, _deferred = _deferred, None
        resend = threading.Timer(RESEND_S, _resend, (signum,))
        resend.daemon = True
        _resends.append(resend)
        resend.start()


def _after_fork_in_child():
    global _deferred
    _deferred = None
    _forks.clear()
    _resends.clear()


def _register_fork_hooks():
    """Once per process. Registered after logging's hooks (torch imports logging before any
    run_cli), ours run first before a fork and last after it, so _forks spans theirs. The
    first and the last are C methods, run without a Python line at which a pending signal
    could be handled outside that span."""
    global _fork_hooks_registered
    if not _fork_hooks_registered:
        os.register_at_fork(before=functools.partial(_forks.append, None),
                            after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        os.register_at_fork(after_in_parent=_forks.pop)
        _fork_hooks_registered = True


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


def _set_stdout_errors(errors):
    """Set sys.stdout's encoding error handler -> the previous one; nothing for a stream
    without one (None, or a test's StringIO), nor for one closed or whose reader is gone
    (reconfigure flushes first: `| head`), which must not replace the script's own ending."""
    previous = getattr(sys.stdout, "errors", None)
    if errors is not None and hasattr(sys.stdout, "reconfigure"):
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.reconfigure(errors=errors)
    return previous


def progress_interval():
    """tqdm's mininterval for a progress bar on stderr: tqdm's 0.1 s on a terminal; 10 s
    elsewhere (run.sh and eval.sh tee the output into logs/), where 10 redraws a second would
    fill a long run's log with megabytes of them, in one line."""
    return 0.1 if sys.stderr.isatty() else 10


def _failure_behind(error):
    """The PeerFailed that a SIGTERM cut short, else `error`. When a process of a torchrun job
    ends (killed, or on its error), torchrun sends SIGTERM to the others: one already unwinding
    from that loss (its collective failed first) would otherwise say "terminated" instead of
    which rank was gone, depending on which came first."""
    context = error.__context__ if isinstance(error, Terminated) else None
    while context is not None and not isinstance(context, PeerFailed):
        context = context.__context__
    return context or error


def run_cli(main, user_errors=USER_ERRORS, argv=None):
    """Run a script's main(argv): a user mistake or an outside condition (UsageError, or one of
    `user_errors`) prints one line `error: ...` to stderr and exits 2 (usage) or 1; Ctrl-C
    exits 130 and SIGTERM 143; anything else is a bug and keeps its traceback. Under torchrun,
    the ranks that rank 0's failure stopped (MainRankFailed) exit with its status without a
    word: rank 0 reports it; so it does a stop signal."""
    # Without a handler SIGTERM ends the process on the spot, skipping every `finally`. A
    # handler can only be set from the main thread (a test may call this from another).
    global _stopping, _deferred
    in_main = threading.current_thread() is threading.main_thread()
    previous, thread_hook = {}, threading.excepthook
    if in_main:  # the handlers are the process's: set (and restored) by its main thread alone
        _register_fork_hooks()
        _stopping, _deferred = None, None
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _stop_signal)
        # SIGINT only where it has Python's own handler (a background job starts ignoring it)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _stop_signal)
        threading.excepthook = _thread_exception
        # A path that is not UTF-8 (its odd bytes held as surrogates) is printed as the bytes it
        # has, as Python does in the C locale; a UTF-8 locale's strict stdout would fail the
        # print, e.g. predict.py's after the mask is written. (stderr escapes them already.)
        stdout_errors = _set_stdout_errors("surrogateescape")
    try:
        return main(argv)
    except MainRankFailed as stopped:
        sys.exit(exit_status(stopped.error_type, user_errors) or 1)
    except (KeyboardInterrupt, UsageError, *user_errors) as error:
        error = _failure_behind(error)
        status = exit_status(type(error), user_errors)
        # A stop signal reaches every process of a torchrun job (the scheduler's, or torchrun
        # passing its own on): rank 0 says it once.
        if status not in STOPPED or launched_rank() == 0:
            print(STOPPED.get(status, f"error: {error}"), file=sys.stderr)
        sys.exit(status)
    except OSError as error:  # a path given too long for the file system, wherever it is used
        if error.errno != errno.ENAMETOOLONG:
            raise
        print(f"error: {error.filename or 'a path'}: file name too long; choose a shorter path",
              file=sys.stderr)
        sys.exit(1)
    finally:
        if in_main:
            threading.excepthook = thread_hook
            for resend in _resends:
                resend.cancel()
            _resends.clear()
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python
                    signal.signal(signum, handler)
            _set_stdout_errors(stdout_errors)


class StopSignals:
    """SIGTERM (what schedulers send before preemption) and SIGINT (Ctrl-C) during the loop
    only ask the run to stop: it finishes the iteration, saves last.pth and exits 128 + signal.
    A second Ctrl-C, SAME_REQUEST_S or more later, quits at once, without saving (one sooner
    is the same request arriving twice). A repeated SIGTERM is ignored: torchrun and
    schedulers forward the same request to every process (Ctrl-C under torchrun also arrives
    as SIGINT from the terminal, then SIGTERM from torchrun)."""

    def __init__(self, log):
        self.log, self.signum, self.since = log, None, None

    def __enter__(self):
        # SIGINT as run_cli takes it: a process started ignoring it (a background job: the
        # terminal's Ctrl-C is meant for the foreground) goes on ignoring it
        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signals.append(signal.SIGINT)
        self.previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, *exc):
        if self.signum is not None:  # run_cli's handler, back, must not act on it again
            mark_stopping()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.since = signum, time.monotonic()
            again = (" (Ctrl-C again, a second or more later, quits at once, without saving)"
                     if signum == signal.SIGINT else "")
            self.log(f"{signal.Signals(signum).name}: saving last.pth and stopping{again}")
        elif signum == signal.SIGINT and time.monotonic() - self.since >= SAME_REQUEST_S:
            # killed by the signal, as without a handler: no unwinding, no save
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which decides when to stop
    (a terminal's Ctrl-C and a scheduler's SIGTERM reach the workers too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
