"""How tests start processes the way users do: one CPU thread each, the repository importable,
and `torchrun --nproc_per_node 2` (two CPU processes, gloo)."""
import os
import socket
import sys

from test_demo import REPO


def script_env(**extra):
    """The environment of a script started by a test."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def torchrun_command(limit_s=None):
    """The start of a torchrun command line, before the script and its flags, its rendezvous on
    a port free now (torchrun's default 29500 may still be held by the run before); under
    `timeout limit_s` when given (a rank left waiting for another would hold the test)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port)]
    return ["timeout", str(limit_s), *command] if limit_s else command
