"""Tests for models/lckd.py on the small configuration (CPU, seconds)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import LCKD, LCKDConfig
from models.lckd import InstanceNorm3d, WSConv3d
from utils.modalities import ALL_SUBSETS, FULL


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_model(**overrides):
    """Small model with random norm affine parameters.

    At initialisation every norm bias is 0, which makes the all-zero image's features exactly 0
    and the image-level ASPP branch 0: random affine parameters keep those paths visible.
    """
    torch.manual_seed(0)
    model = LCKD(LCKDConfig.small(**overrides))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.BatchNorm3d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def image(n=1, size=(16, 64, 64), seed=1):
    return torch.randn(n, 4, *size, generator=torch.Generator().manual_seed(seed))


def published_forward(model, x, subset):
    """Independent re-statement of the published forward: zero the missing channels, encode
    all four modalities of every sample together, fill the missing deep features with the mean
    of the available ones, decode."""
    n, m = x.shape[:2]
    missing = [i for i in range(m) if i not in subset]
    x = x.clone()
    x[:, missing] = 0
    deep, skips = model.encoder(x.reshape(n * m, 1, *x.shape[2:]))
    deep = deep.reshape(n, m, *deep.shape[1:]).clone()
    deep[:, missing] = deep[:, list(subset)].mean(dim=1, keepdim=True)
    return model.decoder(deep.flatten(1, 2), [s.reshape(n, -1, *s.shape[2:]) for s in skips])


def test_published_parameter_count():
    count = sum(p.numel() for p in LCKD(LCKDConfig()).parameters())
    assert count == 43_656_672
    assert abs(count - 43.66e6) / 43.66e6 < 1e-3


def test_weight_standardisation_is_the_published_formula():
    """Published Conv3d_wd: mean taken axis by axis, unbiased variance of the centred filter."""
    torch.manual_seed(0)
    conv = WSConv3d(6, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3).add_(torch.randn(5, 1, 1, 1, 1))  # filters with non-zero means
    w = conv.weight
    centred = w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True).mean(
        dim=4, keepdim=True)
    std = torch.sqrt(torch.var(centred.view(w.size(0), -1), dim=1) + 1e-12).view(-1, 1, 1, 1, 1)
    x = torch.randn(2, 6, 4, 8, 8)
    torch.testing.assert_close(conv(x), F.conv3d(x, centred / std.expand_as(centred), padding=1))
    # ... in channels-last memory format too
    conv_cl = conv.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv_cl(x), F.conv3d(x, centred / std.expand_as(centred), padding=1))


def test_output_shape_for_all_15_subsets():
    model = make_model().eval()
    x = image(2, (16, 32, 32))
    with torch.no_grad():
        for subset in ALL_SUBSETS:
            logits, kd = model(x, subset)
            assert logits.shape == (2, 3, 16, 32, 32)
            assert kd.shape == () and kd.item() == 0.0
        assert model.forward_subsets(x, ALL_SUBSETS).shape == (2, 15, 3, 16, 32, 32)


@pytest.mark.parametrize("norm", ["IN", "BN"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_published_procedure(norm, training):
    model = make_model(norm=norm).train(training)
    x = image(2)
    for subset in [(0,), (1, 3), (0, 2, 3), FULL]:
        with torch.no_grad():
            ours, _ = model(x, subset)
            reference = published_forward(model, x, subset)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("subset", [(1, 3), FULL])
def test_gradients_equal_published_procedure(subset):
    """The backward of our per-modality bookkeeping (split, unbind, zero-image broadcast)."""
    model = make_model().train()
    x = image(2, (16, 32, 32))
    target = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for forward in (lambda: model(x, subset)[0], lambda: published_forward(model, x, subset)):
        model.zero_grad(set_to_none=True)
        (forward() * target).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1].norm() > 0
    # Equal up to fp32 round-off: the procedures sum the same terms in different orders (one
    # zero image's gradient vs. four), 1.5e-5 relative here; detaching the zero image's skips
    # (a backward bug this bookkeeping could have) gives 0.17.
    assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[1].norm()


def test_missing_modality_voxels_do_not_change_output():
    model = make_model().eval()
    x = image()
    changed = x.clone()
    changed[:, [1, 3]] = torch.rand_like(changed[:, [1, 3]]) * 100
    with torch.no_grad():
        assert torch.equal(model(x, (0, 2))[0], model(changed, (0, 2))[0])
        assert not torch.equal(model(x, (0, 1, 2))[0], model(changed, (0, 1, 2))[0])


def test_single_modality_fills_every_deep_feature_with_its_own():
    model = make_model().eval()
    x = image(2)
    with torch.no_grad():
        feats = model.encode(x, (2,), zero_image=True)
        deep, skips = model.fuse(feats, (2,))
        zero_deep, zero_skips = model.encoder(torch.zeros(1, 1, *x.shape[2:]))
    for chunk in deep.chunk(4, dim=1):
        assert torch.equal(chunk, feats.deep[2])
    own, _ = model.encoder(x[:, 2:3])
    torch.testing.assert_close(feats.deep[2], own, atol=1e-5, rtol=1e-5)
    # Skips of the missing modalities are the zero image's, the available one's its own.
    for scale, zero in zip(skips, zero_skips):
        chunks = scale.chunk(4, dim=1)
        for m in (0, 1, 3):
            torch.testing.assert_close(chunks[m], zero.expand_as(chunks[m]), atol=1e-4, rtol=1e-4)
        assert zero.abs().max() > 0  # non-trivial with random norm biases
        assert not torch.allclose(chunks[2], zero.expand_as(chunks[2]))


def test_distillation_value_and_gradient():
    model = make_model().train()
    x = image(2)
    feats = model.encode(x, (0, 1, 3), zero_image=True)
    f0, f1, f3 = feats.deep[0], feats.deep[1], feats.deep[3]
    kd = model.distill(feats, (0, 1, 3), teachers=(1,))
    expected = (f1 - f0).abs().mean() + (f1 - f3).abs().mean()
    torch.testing.assert_close(kd, expected)
    assert kd > 0
    teacher_grad, student_grad = torch.autograd.grad(kd, [f1, f0], allow_unused=True)
    assert teacher_grad is None or not teacher_grad.any()
    assert student_grad is not None and student_grad.abs().sum() > 0
    # Two available teachers: both directions count.
    two = model.distill(feats, (0, 1, 3), teachers=(0, 1))
    torch.testing.assert_close(two, expected + (f0 - f1).abs().mean() + (f0 - f3).abs().mean())


def test_distillation_zero_without_available_teacher():
    model = make_model().train()
    x = image()
    assert model(x, (1, 2), teachers=(0,))[1].item() == 0.0
    assert model(x, (1, 2), teachers=())[1].item() == 0.0
    assert model(x, (1,), teachers=(1,))[1].item() == 0.0  # alone, it has nobody to teach
    assert model(x, (1, 2), teachers=(1,))[1].item() > 0


def test_train_batch_size_one_and_image_level_branch():
    model = make_model().train()
    x = image(1)
    logits, kd = model(x, (0,), teachers=(0,))
    (logits.mean() + kd).backward()
    aspp = model.encoder.head[1]
    conv, norm = aspp.image_branch[0], aspp.image_branch[1]
    assert isinstance(norm, InstanceNorm3d)
    # InstanceNorm of a 1x1x1 map is its bias: the branch is act(bias), its conv gets exactly 0.
    assert conv.weight.grad is not None and not conv.weight.grad.any()
    assert norm.bias.grad.abs().sum() > 0
    features = torch.randn(3, 32, 1, 2, 2)
    with torch.no_grad():
        out = aspp.image_branch(features.mean(dim=(2, 3, 4), keepdim=True))
    torch.testing.assert_close(out, F.leaky_relu(norm.bias, 0.01).view(1, -1, 1, 1, 1).expand(3, -1, 1, 1, 1))
    # Every parameter takes part in the graph (DDP without find_unused_parameters).
    assert all(p.grad is not None for p in model.parameters())
    # Eval with any batch size, including maps whose deepest stage is 1x1x1.
    model.eval()
    with torch.no_grad():
        assert model(image(3, (16, 32, 32)), (0, 1))[0].shape == (3, 3, 16, 32, 32)


def test_forward_subsets_equals_per_subset_forward():
    model = make_model().eval()
    x = image(2)
    with torch.no_grad():
        together = model.forward_subsets(x, ALL_SUBSETS)
        for i, subset in enumerate(ALL_SUBSETS):
            assert (together[:, i] - model(x, subset)[0]).abs().max() <= 1e-4


def test_bf16_autocast_on_cpu():
    model = make_model().train()
    x = image(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, kd = model(x, (0, 2), teachers=(0,))
    assert logits.dtype == torch.bfloat16 and kd.dtype == torch.float32
    (logits.float().mean() + kd).backward()
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        reference, _ = model(x, (0, 2))
    assert (logits.float() - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_encoder_checkpointing_gives_the_same_gradients():
    x = image(1, (16, 32, 32))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = make_model(checkpoint_encoder=checkpointing).train()
        stage_calls = []
        for stage in model.encoder.stages:  # count the stages' runs (forward hooks miss the recompute)
            stage.forward = (lambda run: lambda *a: stage_calls.append(1) or run(*a))(stage.forward)
        logits, kd = model(x, (1, 2), teachers=(1,))
        forward = len(stage_calls)
        (logits.square().mean() + kd).backward()
        calls.append((forward, len(stage_calls)))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # checkpointing really recomputes every stage in backward; without it nothing is rerun
    (plain_forward, plain_total), (ckpt_forward, ckpt_total) = calls
    assert plain_forward > 0 and plain_total == plain_forward
    assert ckpt_forward == plain_forward and ckpt_total == 2 * ckpt_forward


def test_config_and_input_validation():
    assert LCKDConfig.from_name("full") == LCKDConfig()
    small = LCKDConfig.from_name("small", norm="BN")
    assert small.norm == "BN" and small.blocks == (1, 1, 1, 1)
    assert LCKDConfig(**small.to_dict()) == small
    assert LCKDConfig(**{**small.to_dict(), "widths": [8, 16, 32, 40]}) == small  # JSON lists
    with pytest.raises(ValueError):
        LCKDConfig(norm="GN")
    with pytest.raises(ValueError):
        LCKDConfig.from_name("medium")
    model = make_model()
    with pytest.raises(ValueError, match=r"^patch 16x40x32: D must be a multiple of 16 and H, W of 32"):
        model(torch.zeros(1, 4, 16, 40, 32))
    with pytest.raises(ValueError, match=r"^patch 8x32x32: "):
        model(torch.zeros(1, 4, 8, 32, 32))
    with pytest.raises(ValueError, match=r"^expected input \(N, 4, D, H, W\), got \(1, 3, 16, 32, 32\)"):
        model(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match="subset"):
        model(torch.zeros(1, 4, 16, 32, 32), (4,))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 4, 16, 32, 32), ())


# ------------------------------------------------ published details a wrong network would pass
def test_encode_all_distils_only_available_teachers_into_available_students():
    """Published DualNet: `if i_mode_t not in mode_split: continue` and `if i_mode_s not in
    mode_split: continue`. With encode_all (and BN training) the missing modalities are encoded
    too (zero images): they must be neither teacher nor student."""
    model = make_model(encode_all=True).train()
    x = image(2)  # 16x64x64: deep map 1x2x2, features differ between modalities
    feats = model.encode(x, (1, 2), zero_image=True)  # the available ones, independently
    f1, f2 = feats.deep[1].detach(), feats.deep[2].detach()
    expected = (f1 - f2).abs().mean()  # teacher 1 -> student 2 only; teacher 0 is missing
    logits, kd = model(x, (1, 2), teachers=(0, 1))
    assert expected > 0
    torch.testing.assert_close(kd, expected, atol=1e-5, rtol=1e-4)
    _, kd_missing_teacher = model(x, (1, 2), teachers=(0,))
    assert kd_missing_teacher.item() == 0.0


def test_encode_all_leaves_the_input_alone_and_equals_the_default_path():
    """encode_all zeroes the missing channels of a COPY: the caller's batch is untouched, and
    forward_subsets (which runs one forward per subset on the same x) gives the default path's
    logits."""
    x = image(2, (16, 32, 32))
    before = x.clone()
    published = make_model(encode_all=True).eval()
    default = make_model().eval()
    subsets = [(0,), (1, 3), (0, 1, 2, 3)]
    with torch.no_grad():
        published(x, (1, 3))
        assert torch.equal(x, before)
        together = published.forward_subsets(x, subsets)
        reference = default.forward_subsets(before.clone(), subsets)
    assert torch.equal(x, before)
    torch.testing.assert_close(together, reference, atol=1e-4, rtol=1e-4)


def _trilinear_x2_hw(a):
    """Independent re-statement of trilinear upsampling x(1, 2, 2), align_corners=False
    (published nn.Upsample(scale_factor=(1, 2, 2), mode='trilinear')): along H and W output
    2i = 0.25 x[i-1] + 0.75 x[i], 2i+1 = 0.75 x[i] + 0.25 x[i+1], edges repeated."""
    def axis(v, ax):
        v = np.moveaxis(v, ax, -1)
        p = np.concatenate([v[..., :1], v, v[..., -1:]], axis=-1)
        even = 0.25 * p[..., :-2] + 0.75 * p[..., 1:-1]
        odd = 0.75 * p[..., 1:-1] + 0.25 * p[..., 2:]
        out = np.stack([even, odd], axis=-1).reshape(*v.shape[:-1], 2 * v.shape[-1])
        return np.moveaxis(out, -1, ax)
    return axis(axis(a, 3), 4)


def test_decoder_ends_with_trilinear_upsampling_of_the_classifier():
    """"""
    model = make_model().eval()
    seen = []
    model.decoder.classifier.register_forward_hook(lambda m, i, o: seen.append(o.detach().double().numpy()))
    with torch.no_grad():
        logits, _ = model(image(1, (16, 32, 32)), (0, 2))
    expected = _trilinear_x2_hw(seen[0])
    assert logits.shape == (1, 3, 16, 32, 32) and expected.shape == logits.shape
    np.testing.assert_allclose(logits.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_aspp_dilations_are_published():
    """Published ASPP: 3x3x3 branches with dilation (= padding) 2, 4, 8."""
    assert LCKDConfig().aspp_dilations == (2, 4, 8)
    aspp = LCKD(LCKDConfig.small()).encoder.head[1]
    convs = [branch[0] for branch in aspp.branches]
    assert [c.kernel_size for c in convs] == [(1, 1, 1)] + [(3, 3, 3)] * 3
    assert [c.dilation for c in convs[1:]] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [c.padding for c in convs[1:]] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]


def test_bottleneck_strides_in_its_3x3x3_conv():
    """Published Res50.Bottleneck: conv1 1x1 (stride 1), conv2 3x3x3 with the stage's stride,
    shortcut 1x1 with the stride."""
    model = LCKD(LCKDConfig.small())
    for i, stage in enumerate(model.encoder.stages):
        first = [m for m in stage if m.__class__.__name__ == "Bottleneck"][0]
        stride = (1, 1, 1) if i == 0 else (2, 2, 2)
        assert first.body[0][0].kernel_size == (1, 1, 1) and first.body[0][0].stride == (1, 1, 1)
        assert first.body[1][0].kernel_size == (3, 3, 3) and first.body[1][0].stride == stride
        assert first.body[2].stride == (1, 1, 1)
        assert first.shortcut[0].stride == stride


def test_published_he_normal_fan_out_initialisation():
    """kaiming_normal_(mode='fan_out'): std = sqrt(2 / fan_out). Stem (8, 1, 7, 7, 7): fan_out
    8 * 343 = 2744 -> 0.0270 (fan_in would give 0.0764). Decoder's first transposed conv
    (128, 32, 2, 2, 2): PyTorch's fan_out is size(0) * 8 = 1024 -> 0.0442 (fan_in: 0.0884).
   """
    torch.manual_seed(0)
    model = LCKD(LCKDConfig.small())
    stem = model.encoder.stem[0].weight
    assert stem.shape == (8, 1, 7, 7, 7)
    assert stem.std().item() == pytest.approx((2 / 2744) ** 0.5, rel=0.1)
    up = model.decoder.up[0].weight
    assert up.shape == (128, 32, 2, 2, 2)
    assert up.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.1)


def test_aspp_image_branch_is_the_global_mean_with_batchnorm():
    """Published: torch.mean(x, [2, 3, 4], True) -> conv -> norm -> act -> broadcast. With IN the
    branch is a constant whatever its input; with BN (eval, running statistics) it depends on the
    mean."""
    model = make_model(norm="BN").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    aspp = model.encoder.head[1]
    x = torch.randn(2, 32, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        g = x.mean(dim=(2, 3, 4), keepdim=True)
        conv, bn = aspp.image_branch[0], aspp.image_branch[1]
        w = conv.weight
        w = (w - w.mean(dim=(1, 2, 3, 4), keepdim=True)) / torch.sqrt(w.var(dim=(1, 2, 3, 4), keepdim=True) + 1e-12)
        y = F.conv3d(g, w)
        y = (y - bn.running_mean.view(1, -1, 1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1, 1) + bn.eps)
        y = F.leaky_relu(y * bn.weight.view(1, -1, 1, 1, 1) + bn.bias.view(1, -1, 1, 1, 1), 0.01)
        expected = aspp.fuse(torch.cat([b(x) for b in aspp.branches] + [y.expand(-1, -1, 2, 2, 2)], dim=1))
        torch.testing.assert_close(aspp(x), expected, atol=1e-5, rtol=1e-5)
