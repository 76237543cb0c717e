"""utils/cli.py: the published boolean flag values, as train.py and eval.py parse them, and
one-line errors."""
import argparse
import errno
import io
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import eval as eval_script
import predict
import train
from datasets.brats import DataError
from test_demo import REPO
from utils import cli, distributed
from utils.cli import SAME_REQUEST_S, Terminated, UsageError, run_cli, str2bool
from utils.distributed import MainRankFailed, PeerFailed


@pytest.mark.parametrize("text", ["True", "true", "T", "yes", "Y", "1", " True "])
def test_true(text):
    assert str2bool(text) is True


@pytest.mark.parametrize("text", ["False", "false", "f", "NO", "n", "0", "False\n"])
def test_false(text):
    assert str2bool(text) is False


@pytest.mark.parametrize("text", ["", "2", "maybe", "Truee"])
def test_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a boolean"):
        str2bool(text)


def test_both_scripts_parse_published_flags_alike():
    args = train.parse_args(["--random_mirror", "False", "--weight_std", "t"])
    assert args.random_mirror is False and args.weight_std is True
    args = eval_script.parse_args(["--restore_from", "x.pth", "--weight_std", "f"])
    assert args.weight_std is False


def test_a_flag_is_taken_only_by_its_whole_name(capsys):
    # argparse's default reads a prefix as the flag it starts: predict.py would take eval.py's
    # `--input` for --input_size.
    with pytest.raises(SystemExit):
        predict.parse_args(["--input", "case", "--checkpoint", "c.pth", "-o", "m.nii.gz"])
    assert capsys.readouterr().err == ("error: unrecognized arguments: --input case "
                                       "(see predict.py --help)\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--num_step", "3"])
    assert capsys.readouterr().err == ("error: unrecognized arguments: --num_step 3 "
                                       "(see train.py --help)\n")
    # the misspelling named, not the required flag it left out
    with pytest.raises(SystemExit):
        predict.parse_args(["--t2", "P01_t2.nii.gz", "--checkpoint", "c.pth", "--out=m.nii.gz"])
    assert capsys.readouterr().err == ("error: unrecognized arguments: --out (see predict.py "
                                       "--help)\n")
    with pytest.raises(SystemExit):
        predict.parse_args(["--t2", "P01_t2.nii.gz", "-o", "m.nii.gz"])
    assert capsys.readouterr().err == ("error: the following arguments are required: "
                                       "--checkpoint (see predict.py --help)\n")


def _raises(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error, status", [(UsageError("--num_steps 0 leaves nothing"), 2),
                                           (FloatingPointError("non-finite loss"), 1),
                                           (KeyboardInterrupt(), 130), (Terminated(), 143)])
def test_user_errors_print_one_line(capsys, error, status):
    with pytest.raises(SystemExit) as exit_:
        run_cli(_raises(error), user_errors=(FloatingPointError,))
    assert exit_.value.code == status
    expected = {130: "interrupted", 143: "terminated"}.get(status, f"error: {error}")
    assert capsys.readouterr().err.splitlines() == [expected]


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler for the test: pytest started in the background (a script's
    `pytest … &`) has SIGINT ignored, and run_cli then leaves it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


WHOLE = ["started", "finished"]  # the script's cleanup ran to its end


@pytest.mark.parametrize("first, second, apart, status, line, unwound_as", [
    (signal.SIGTERM, None, 0, 143, "terminated", WHOLE),
    # a scheduler signals every process of the job and run.sh passes the signal on too
    (signal.SIGTERM, signal.SIGTERM, SAME_REQUEST_S, 143, "terminated", WHOLE),
    # Ctrl-C pressed twice in a row, or a sender that signals every process of a job
    (signal.SIGINT, signal.SIGINT, 0, 130, "interrupted", WHOLE),
    (signal.SIGTERM, signal.SIGINT, 0, 143, "terminated", WHOLE),
    # Ctrl-C pressed again a second or more later: the user's, it cuts the unwinding short
    (signal.SIGINT, signal.SIGINT, SAME_REQUEST_S, 130, "interrupted", ["started"])])
def test_a_stop_signal_unwinds_the_script_and_a_repeat_is_the_same_request(
        capsys, monkeypatch, ctrl_c, first, second, apart, status, line, unwound_as):
    # Without a handler SIGTERM ends the process on the spot; under run_cli the script's `finally`
    # blocks run (temporary files removed, locks released), then one line and status 143 or 130.
    # The same request arriving again during the unwinding must not cut its cleanup short (in
    # eval.py a second KeyboardInterrupt left a writer thread's file as a temporary, Python's
    # traceback from its exit, or an abort in torch's threads).
    clock = itertools.count(100.0, apart)  # run_cli's clock: `apart` s later at each reading
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    previous = signal.getsignal(signal.SIGTERM)
    unwound = []

    def main(argv):
        try:
            os.kill(os.getpid(), first)
            time.sleep(60)  # not reached: the handler raises as soon as the signal arrives
        finally:
            unwound.append("started")
            if second:
                os.kill(os.getpid(), second)  # delivered here, before the next line
            unwound.append("finished")

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == status and unwound == unwound_as
    assert capsys.readouterr().err.splitlines() == [line]
    assert signal.getsignal(signal.SIGTERM) is previous  # the caller's handler is back


@pytest.mark.parametrize("failure, status, line", [
    (PeerFailed("rank 0: another process of this run is gone"), 1,
     "error: rank 0: another process of this run is gone"),
    (DataError("case A: missing file"), 143, "terminated")])
def test_sigterm_while_a_lost_peer_is_reported_keeps_the_report(capsys, failure, status, line):
    # Under torchrun, a rank killed without a word makes the others' next collective fail
    # (PeerFailed), and torchrun sends them SIGTERM about then: a signal that comes while the
    # script unwinds from PeerFailed must not hide which process was lost behind "terminated"
    # (test_train's killed-rank test lost that race now and then). Any other error a SIGTERM
    # interrupts is the signal's stop, as before.
    def main(argv):
        try:
            raise failure
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, during the unwinding

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == status
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("signum, status, line", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("first", [True, False])
def test_a_stop_signal_during_a_fork_is_not_lost(signum, status, line, first):
    # A signal that arrives while the process forks (a DataLoader starting its workers: the
    # fork of a large process is slow) is handled in the first Python code after the fork,
    # logging's at-fork hook, where an exception is only printed: the request was lost (SIGTERM
    # ignored for good) and logging's lock stayed held, blocking every other thread that logs.
    # Here libc's kill (os.kill would run the handler at once) in a before-fork hook leaves the
    # signal pending across the fork, as one that arrives during it; registered first, the hook
    # runs after every other before-fork hook, registered last (in main), before run_cli's own.
    hook = ("os.register_at_fork(before=functools.partial(ctypes.CDLL(None).kill, os.getpid(), "
            f"{int(signum)}))")
    script = f"""
import ctypes, functools, os, signal, sys
assert "logging" not in sys.modules
{hook if first else ""}
import logging, threading, time
from utils.cli import run_cli
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with it ignored
def main(argv):
    {"" if first else hook}
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    threading.Thread(target=logging.warning, args=("another thread logs",), daemon=True).start()
    time.sleep(20)
    print("the signal was lost")
run_cli(main)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == status and done.stdout == "", done.stdout + done.stderr
    assert sorted(done.stderr.splitlines()) == ["WARNING:root:another thread logs", line], done.stderr


def test_a_path_too_long_for_the_file_system_is_one_line(capsys, tmp_path):
    # wherever a script first touches it (an exists() check, a mkdir, an open)
    path = tmp_path / ("x" * 300)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: path.exists())
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: file name too long; choose a shorter path"]


def test_a_path_that_is_not_utf8_is_printed_as_its_bytes(monkeypatch):
    # A UTF-8 locale's stdout is strict: printing such a path (predict.py's output, written
    # already) used to end in a UnicodeEncodeError traceback. run_cli restores the stream after.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    name = os.fsdecode(b"M\xfcller.nii.gz")
    run_cli(lambda argv: print(f"written to {name}"))
    stdout.flush()
    assert stdout.buffer.getvalue() == b"written to M\xfcller.nii.gz\n"
    assert stdout.errors == "strict"


def test_a_reader_gone_from_stdout_does_not_change_how_the_script_ends(monkeypatch):
    # `script | head`: restoring the error handler flushes stdout, which raised BrokenPipeError
    # in place of the script's result, leaving run_cli's SIGTERM handler set.
    class Pipe(io.RawIOBase):
        gone = True

        def writable(self):
            return True

        def write(self, data):
            if self.gone:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return len(data)

    pipe = Pipe()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(pipe), encoding="utf-8"))
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(lambda argv: print("a table") or 7) == 7
    assert signal.getsignal(signal.SIGTERM) is before
    pipe.gone = False  # let the stream close quietly


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError):
        run_cli(_raises(KeyError("bug")), user_errors=(FloatingPointError,))


@pytest.mark.parametrize("error_type, status", [(UsageError, 2), (FloatingPointError, 1),
                                                (KeyError, 1), (KeyboardInterrupt, 130),
                                                (Terminated, 143)])
def test_ranks_stopped_by_rank_0_leave_quietly_with_its_status(capsys, error_type, status):
    # Under torchrun rank 0 prints its error; the ranks it stopped exit as it does, silently
    # (a bug on rank 0, KeyError here, keeps its traceback there; the others exit 1).
    with pytest.raises(SystemExit) as exit_:
        run_cli(_raises(MainRankFailed(error_type)), user_errors=(FloatingPointError,))
    assert exit_.value.code == status
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_one_line_user_error(capsys):
    def main(argv):
        distributed.resolve_device("cuda")

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --device cuda: CUDA is not available here (no GPU, no driver, or a CPU-only "
        "PyTorch); use --device cpu (run.sh, eval.sh: cpu in place of the GPU id)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name, local_rank", [("auto", None), ("cpu", None), ("auto", 0), ("cpu", 3)])
def test_devices_on_a_machine_without_cuda_resolve_to_the_cpu(name, local_rank):
    assert distributed.resolve_device(name, local_rank) == torch.device("cpu")


@pytest.mark.parametrize("name, expected", [
    ("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("cuda:x", "--device 'cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("meta", "--device 'meta': expected auto, cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99: only " if torch.cuda.is_available()
     else "--device cuda:99: CUDA is not available here"),
])
def test_devices_that_are_not_there_are_device_errors(name, expected):
    with pytest.raises(distributed.DeviceError) as error:
        distributed.resolve_device(name)
    assert str(error.value).startswith(expected)


INFERENCE_ARGV = {eval_script: ["--restore_from", "missing.pth"],
                  predict: ["--flair", "f.nii.gz", "--checkpoint", "c.pth", "-o", "m.nii.gz"]}


@pytest.mark.parametrize("script", [eval_script, predict, train])
@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_a_misspelt_device_is_a_flag_error_in_every_script(script, name, capsys):
    # eval.py and predict.py exited 1 ("--device 'gpu': expected ..."); a flag error is 2.
    # (train.py's --device is a choice of auto, cpu and cuda.)
    with pytest.raises(SystemExit) as exit_:
        run_cli(script.main, argv=[*INFERENCE_ARGV.get(script, []), "--device", name])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.startswith("error: argument --device: ")
    if script is not train:
        assert line == (f"error: argument --device: expected auto, cpu, cuda or cuda:N, got "
                        f"{name!r} (see {script.__name__}.py --help)")


@pytest.mark.parametrize("script", [eval_script, predict])
def test_a_device_named_right_is_parsed_whatever_the_machine(script):
    # whether it is here (a GPU, its index) is found when resolved: DeviceError, exit 1
    for name in ("auto", "cpu", "cuda", "cuda:1"):
        assert script.parse_args([*INFERENCE_ARGV[script], "--device", name]).device == name


def test_run_cli_sets_the_thread_hook_from_the_main_thread_only_and_restores_it():
    before, seen = threading.excepthook, []
    run_cli(lambda argv: seen.append(threading.excepthook))
    assert seen[0] is not before and threading.excepthook is before  # set, then restored
    worker = threading.Thread(target=run_cli, args=(lambda argv: seen.append(threading.excepthook),))
    worker.start()
    worker.join()
    assert seen[1] is before and threading.excepthook is before  # another thread: untouched


def test_progress_bars_are_redrawn_every_10_s_off_a_terminal(monkeypatch):
    # run.sh / eval.sh tee the bars into logs/: tqdm's 0.1 s there is megabytes of redraws
    from utils.cli import progress_interval
    for tty, interval in ((True, 0.1), (False, 10)):
        monkeypatch.setattr(sys, "stderr", type("Stream", (), {"isatty": lambda self, t=tty: t})())
        assert progress_interval() == interval
