"""How the training step is run, not what it computes: memory format, torch.compile, optimizer
implementation. train.py's `--channels_last`, `--compile` flags; README, "Speed options".

'auto' means on for CUDA and off on a CPU, where runs keep the plain path: compile time
(about 30 s per graph for the small model) would dominate the short CPU runs, the demo and the
tests. Channels-last alone did measure faster there (small model, one thread: steps ~8 %
faster, bench_train.py): `--channels_last on`.
"""
import importlib.util
import inspect

import torch

CHANNELS_LAST = torch.channels_last_3d

# Graphs one process compiles, all static-shape: the encoder sees N*k + 1 images for k = 1, 2,
# 3 available modalities (the all-zero image appended) and N*4 with all four; the decoder N;
# the election adds eval-mode graphs (N*4 + 1 images, and the last, smaller window batch).
# Module.compile compiles nn.Module._call_impl, one code object whose cache all compiled modules
# share, so these add up to about 9, past torch's default limit of 8 (after which dynamo falls
# back to eager for new shapes).
RECOMPILE_LIMIT = 16


def resolve(flag, device):
    """'on' / 'off' / 'auto' -> bool; auto is on for CUDA (compile: if torch and Triton allow)."""
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"expected auto, on or off, got {flag!r}")
    if flag != "auto":
        return flag == "on"
    return device.type == "cuda"


def resolve_compile(flag, device):
    """Like resolve(); 'auto' also needs Triton."""
    if flag == "auto" and importlib.util.find_spec("triton") is None:
        return False
    return resolve(flag, device)


def compile_network(model):
    """Compile model.encoder and model.decoder in place, static shapes.

    In place (nn.Module.compile) keeps the state_dict keys, so checkpoints do not depend on
    the flag. Encoder and decoder rather than LCKD.forward: the forward branches in Python on
    the subset and the teachers (up to 14 subsets x teacher sets would each be a graph), while
    encoder and decoder see only tensors, so their graphs depend on batch sizes alone, a
    handful per process (RECOMPILE_LIMIT). dynamic=False because the alternative, one graph
    with a symbolic batch size, failed to compile this encoder (torch 2.13 Inductor,
    ValueRangeError), and static shapes give the best kernels; each shape compiles once.
    """
    from torch import _dynamo  # here, not at the top: importing it costs 1.5 s, for compiled runs only

    config = _dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    model.encoder.compile(dynamic=False)
    model.decoder.compile(dynamic=False)


def prepare_model(model, device, channels_last="auto", compile="auto"):
    """Apply the speed flags to a model already on `device`; returns {option: bool}.

    Channels-last converts the conv weights; the network's inputs need no conversion: the
    encoder folds modalities into the batch, and a one-channel (B, 1, D, H, W) tensor is
    already channels-last, so every conv output follows the weights' format.
    """
    options = {"channels_last": resolve(channels_last, device), "compile": resolve_compile(compile, device)}
    if options["channels_last"]:
        model.to(memory_format=CHANNELS_LAST)
    if options["compile"]:
        compile_network(model)
    return options


def sgd_implementation(device):
    """SGD keyword arguments: fused on CUDA (one kernel for all parameters, and GradScaler
    skips its separate unscale pass and host sync), else torch's default for the device.

    Also re-applied after loading an optimizer state: load_state_dict takes these settings
    from the checkpoint, which another device or torch version may have written.
    """
    if device.type != "cuda":
        return {"fused": None, "foreach": None}
    if "fused" in inspect.signature(torch.optim.SGD).parameters:
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def to_device(values, device, dtype=None):
    """A small host array, list or CPU tensor copied to `device` without a host synchronisation.

    On CUDA, PyTorch's copy from pageable memory synchronises the stream after it: the host
    waits for all the queued device work, so one such copy per iteration lets the GPU run dry
    while the host prepares the next step. A copy from pinned memory is queued instead (the
    caching host allocator keeps the pinned block until the copy has run).
    """
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def synchronize(device):
    """Wait for the device's queued work (a host sync: only at the edges of a timed window)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
