"""utils/speed.py: the speed options change how the step runs, not what it computes (CPU, small
model; torch.compile is wired but never run here: it would add minutes of compilation)."""
import copy

import numpy as np
import pytest
import torch

from test_model import image, make_model
from utils import speed

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def relative_error(value, reference):
    return ((value.float() - reference).norm() / reference.norm()).item()


def test_auto_is_on_for_cuda_only():
    assert speed.resolve("auto", CUDA) and not speed.resolve("auto", CPU)
    assert speed.resolve("on", CPU) and not speed.resolve("off", CUDA)
    assert not speed.resolve_compile("auto", CPU) and not speed.resolve_compile("off", CUDA)
    with pytest.raises(ValueError):
        speed.resolve("yes", CPU)
    assert speed.sgd_implementation(CPU) == {"fused": None, "foreach": None}  # torch's default
    assert speed.sgd_implementation(CUDA)["fused"] or speed.sgd_implementation(CUDA)["foreach"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo import
def test_prepare_model_converts_weights_and_compiles_in_place():
    model = make_model()
    keys = list(model.state_dict())
    options = speed.prepare_model(model, CPU, channels_last="on", compile="on")
    assert options == {"channels_last": True, "compile": True}
    conv_weights = [p for p in model.parameters() if p.dim() == 5]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in conv_weights)
    assert any(not p.is_contiguous() for p in conv_weights)  # really re-laid out, not just 1x1x1
    # Compiled lazily at the first call; checkpoints keep the plain keys.
    assert model.encoder._compiled_call_impl is not None and model.decoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    config = torch._dynamo.config
    assert getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 0)) >= speed.RECOMPILE_LIMIT
    untouched = make_model()
    assert speed.prepare_model(untouched, CPU) == {"channels_last": False, "compile": False}
    assert untouched.encoder._compiled_call_impl is None
    assert all(p.is_contiguous() for p in untouched.parameters())


@pytest.mark.parametrize("subset", [(0, 2, 3), (0, 1, 2, 3), (1,)])
def test_optimised_path_logits_within_bf16_tolerance(subset):
    """Channels-last + bf16 autocast (the GPU default, compile aside) against plain fp32.

    bf16 keeps 8 significant bits: each rounding errs by up to 2^-8 = 0.39 %, and about 20
    conv layers in sequence (InstanceNorm rescales each) accumulate it like a random walk,
    giving ~1.1 % relative L2 error on the logits here. 3 % allows for other inputs and seeds;
    a wrong permutation (kernels' H and W swapped, as a bad layout conversion would do) gives
    ~60 %, and fp32 channels-last alone agrees to fp32 round-off.
    """
    reference_model = make_model().train()
    fast = copy.deepcopy(reference_model)
    speed.prepare_model(fast, CPU, channels_last="on", compile="off")
    x = image(2, (16, 32, 32))
    with torch.no_grad():
        reference, _ = reference_model(x, subset, teachers=(0,))
        channels_last, _ = fast(x, subset, teachers=(0,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            optimised, kd = fast(x, subset, teachers=(0,))
    assert optimised.dtype == torch.bfloat16 and kd.dtype == torch.float32
    assert relative_error(channels_last, reference) < 1e-5
    assert relative_error(optimised, reference) < 3e-2

    with torch.no_grad():
        for module in fast.modules():
            if isinstance(module, torch.nn.Conv3d) and module.kernel_size[1] > 1:
                module.weight.copy_(module.weight.transpose(3, 4).clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wrong, _ = fast(x, subset, teachers=(0,))
    assert relative_error(wrong, reference) > 10 * 3e-2


def test_fused_sgd_on_channels_last_parameters_matches_default_sgd():
    """The CUDA configuration (fused Nesterov SGD over channels-last weights), run on a CPU."""
    if speed.sgd_implementation(CUDA)["fused"] is None:
        pytest.skip("this torch has no fused SGD")
    models = [make_model().to(memory_format=torch.channels_last_3d) for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.99, nesterov=True, **impl)
                  for m, impl in zip(models, ({}, {"fused": True}))]
    x = image(1, (16, 32, 32))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            logits, kd = model(x, (0, 2), teachers=(0,))
            optimizer.zero_grad(set_to_none=True)
            (logits.square().mean() + kd).backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert b.is_contiguous(memory_format=torch.channels_last_3d) or b.dim() != 5
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(models[0].parameters(), make_model().parameters()))


def test_to_device_keeps_values_and_dtype():
    table = np.arange(12, dtype=np.uint8).reshape(4, 3)
    out = speed.to_device(table, CPU)
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), table)
    floats = speed.to_device([0.5, 1.25, -3.0], CPU, torch.float32)
    assert floats.dtype == torch.float32 and floats.tolist() == [0.5, 1.25, -3.0]
    matrix = torch.randn(3, 3, dtype=torch.float64)
    assert torch.equal(speed.to_device(matrix.to(torch.float32), CPU), matrix.to(torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists on CUDA only")
def test_the_training_iteration_never_waits_for_the_device():
    """Between check points train.py's loop queues work only: normalise, resize and flip the
    batch, augment it, step (bf16, channels-last, fused SGD). A host synchronisation is an
    error under torch's sync debug mode. Run by benchmarks/gpu.sh (part checks)."""
    from datasets.augment import augment_batch
    from datasets.sampling import PatchDataset
    from test_sampling import make_case
    from train import step

    dataset = PatchDataset([make_case(shape=(40, 80, 72))[0]], (16, 32, 32), seed=0, length=8)
    batches = [{k: v.pin_memory() for k, v in torch.utils.data.default_collate(
        [dataset[2 * i], dataset[2 * i + 1]]).items()} for i in range(4)]  # as the DataLoader pins
    assert any(tuple(s) != (16, 32, 32) for b in batches for s in b["size"].tolist())  # a resize
    model = make_model().to(CUDA)
    speed.prepare_model(model, CUDA, channels_last="on", compile="off")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                **speed.sgd_implementation(CUDA))
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def iteration(i, batch):
        image, regions = dataset.to_device(batch, CUDA)
        image, regions = augment_batch(image, regions, seed=i)
        return step(model, optimizer, scaler, image, regions, ((0, 2), (1,), (0, 1, 2, 3))[i % 3], (2,),
                    "bf16", 0.1)

    iteration(0, batches[0])  # allocations, cuDNN and pinned-memory caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [iteration(i, batch)[0] for i, batch in enumerate(batches, 1)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(loss).item() for loss in losses)


def conv_errors(device, depth, stride, dilation, channels_last, channels=64):
    """Relative L2 errors of a bf16 3x3x3 conv3d (output, input gradient, weight gradient)
    against fp32 on the same bf16-rounded input, weight and output gradient."""
    g = torch.Generator().manual_seed(depth * 100 + stride * 10 + dilation)
    x = torch.randn(2, channels, depth, 2 * depth, 2 * depth, generator=g).bfloat16()
    w = torch.randn(channels, channels, 3, 3, 3, generator=g).bfloat16()
    if channels_last:
        x, w = (t.to(memory_format=torch.channels_last_3d) for t in (x, w))
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        xi, wi = (t.to(device, dtype, copy=True).requires_grad_() for t in (x, w))
        y = torch.nn.functional.conv3d(xi, wi, stride=stride, padding=dilation, dilation=dilation)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        y.backward(grad.to(device, dtype))
        results.append([t.detach().float().cpu() for t in (y, xi.grad, wi.grad)])
    return [relative_error(low, reference) for low, reference in zip(*results)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 training runs on CUDA only "
                    "(train.py refuses it on a CPU)")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("depth, stride, dilation", [(2, 1, 1), (3, 1, 1), (5, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_bf16_conv_gradients_on_cuda(depth, stride, dilation, channels_last):
    """The network's 3x3x3 convs on its deepest maps (depth 2 at a patch depth of 16 or 32,
    5 at the published 80): on a CPU, torch's bf16 weight gradient of the depth-2 stride-1
    case errs by ~100 % or is inf, which is why train.py refuses bf16 there. Rounding the bf16
    result alone gives ~0.2 %. Run by benchmarks/gpu.sh (part checks)."""
    errors = conv_errors(CUDA, depth, stride, dilation, channels_last)
    assert max(errors) < 2e-2, dict(zip(("output", "input gradient", "weight gradient"), errors))
