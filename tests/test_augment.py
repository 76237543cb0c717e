"""Batch augmentation: binary aligned labels, zero padding, identity, zero channels, seeds."""
import time
from dataclasses import fields

import numpy as np
import pytest
import torch
from scipy import ndimage

import datasets.augment as aug
from datasets.augment import (
    AugmentConfig, _Draw, _draw_ranged_factor, _gaussian_blur, _gaussian_matrix, augment_batch,
)

SPATIAL = ("p_elastic", "p_rotation", "p_scale", "p_mirror_axis")
PROBABILITIES = tuple(f.name for f in fields(AugmentConfig) if f.name.startswith("p_"))
SHAPE = (16, 32, 28)  # anisotropic on purpose: catches axis-order mistakes


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def cube_batch(batch=2, shape=SHAPE):
    """Channel 0 = a bright off-centre box (1 inside, 0 outside) = region 1 (WT); ET/TC are
    smaller boxes inside; channels 1-3 random; channel 3 of sample 1 all zero (missing)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((batch, 4, *shape), generator=gen)
    regions = torch.zeros((batch, 3, *shape), dtype=torch.uint8)
    image[:, 0] = 0
    image[:, 0, 4:12, 8:22, 6:18] = 1
    regions[:, 1, 4:12, 8:22, 6:18] = 1
    regions[:, 2, 6:10, 11:18, 9:15] = 1
    regions[:, 0, 7:9, 13:16, 11:13] = 1
    image[1, 3] = 0
    return image, regions


def dice(a, b):
    return 2 * (a & b).sum().item() / (a.sum() + b.sum()).item()


def test_identity_when_all_probabilities_zero():
    image, regions = cube_batch()
    out_image, out_regions = augment_batch(image, regions, seed=3, config=AugmentConfig().only())
    assert out_image.dtype == torch.float32 and out_regions.dtype == torch.float32
    assert torch.equal(out_image, image) and torch.equal(out_regions, regions.float())


def test_only_keeps_the_configs_other_settings():
    config = AugmentConfig(elastic_alpha=(600.0, 900.0), p_gamma=0.3).only("p_elastic")
    assert config.elastic_alpha == (600.0, 900.0)  # only() rebuilt from the defaults: (0, 900)
    assert (config.p_elastic, config.p_gamma, config.p_rotation) == (1.0, 0.0, 0.0)


def test_defaults_are_published():
    c = AugmentConfig()
    assert (c.p_elastic, c.elastic_alpha, c.elastic_sigma) == (0.2, (0.0, 900.0), (9.0, 13.0))
    assert (c.p_rotation, c.rotation_degrees, c.p_scale, c.scale_range) == (0.2, 15.0, 0.2, (0.85, 1.25))
    assert (c.p_noise, c.noise_variance) == (0.1, (0.0, 0.1))
    assert (c.p_blur, c.p_blur_channel, c.blur_sigma) == (0.2, 0.5, (0.5, 1.0))
    assert (c.p_brightness_mult, c.brightness_mult_range) == (0.15, (0.75, 1.25))
    assert (c.p_brightness_add, c.p_brightness_add_channel, c.brightness_add_std) == (0.15, 0.5, 0.1)
    assert (c.p_contrast, c.contrast_range) == (0.15, (0.75, 1.25))
    assert (c.p_low_res, c.p_low_res_channel, c.low_res_zoom) == (0.25, 0.5, (0.5, 1.0))
    assert (c.p_gamma, c.gamma_range, c.p_mirror_axis) == (0.15, (0.7, 1.5), 0.5)


@pytest.mark.parametrize("names", [(n,) for n in SPATIAL] + [SPATIAL])
def test_spatial_transforms_keep_labels_binary_and_aligned(names):
    image, regions = cube_batch()
    config = AugmentConfig(elastic_alpha=(600.0, 900.0)).only(*names)
    for seed in range(3):
        out_image, out_regions = augment_batch(image, regions, seed, config)
        assert set(out_regions.unique().tolist()) <= {0.0, 1.0}
        assert not torch.equal(out_regions, regions.float())  # the transform did something
        for b in range(2):
            bright, label = out_image[b, 0] > 0.5, out_regions[b, 1] > 0
            assert dice(bright, label) > 0.9
            inside, outside = out_image[b, 0][label].mean(), out_image[b, 0][~label].mean()
            assert inside > 0.8 and outside < 0.1
            # nesting survives: ET inside TC inside WT
            assert (out_regions[b, 0] <= out_regions[b, 2]).all()
            assert (out_regions[b, 2] <= out_regions[b, 1]).all()


def test_unit_scaling_is_the_identity_grid():
    """Scale 1, no rotation: the grid hits voxel centres, so the output equals the input
    (checks the (d, h, w) -> (x, y, z) order and the normalisation on an anisotropic patch)."""
    image, regions = cube_batch()
    config = AugmentConfig(scale_range=(1.0, 1.0)).only("p_scale")
    out_image, out_regions = augment_batch(image, regions, 0, config)
    torch.testing.assert_close(out_image, image, atol=1e-4, rtol=0)  # float32 grid rounding
    assert torch.equal(out_regions, regions.float())


def test_zoom_out_pads_with_zeros():
    image = torch.ones((2, 4, *SHAPE))
    regions = torch.ones((2, 3, *SHAPE))
    config = AugmentConfig(scale_range=(1.25, 1.25)).only("p_scale")
    out_image, out_regions = augment_batch(image, regions, 0, config)
    # coordinates x1.25 about the centre: the outer ~10 % of each side samples outside
    assert (out_image[:, :, 0] == 0).all() and (out_image[:, :, :, :, -1] == 0).all()
    assert (out_regions[:, :, 0] == 0).all() and (out_regions[:, :, :, 0] == 0).all()
    assert torch.allclose(out_image[:, :, 8, 16, 14], torch.ones(2, 4))
    assert (out_regions[:, :, 8, 16, 14] == 1).all()


def test_intensity_transforms_leave_labels_and_zero_channels_alone():
    image, regions = cube_batch()
    intensity = [n for n in PROBABILITIES if n not in SPATIAL]
    for seed in range(3):
        out_image, out_regions = augment_batch(image, regions, seed, AugmentConfig().only(*intensity))
        assert torch.equal(out_regions, regions.float())
        assert not torch.allclose(out_image[:, :3], image[:, :3])
        assert (out_image[1, 3] == 0).all()
        assert torch.isfinite(out_image).all()


def test_zero_channel_stays_zero_under_everything():
    image, regions = cube_batch()
    for seed in range(3):
        out_image, _ = augment_batch(image, regions, seed, AugmentConfig().only(*PROBABILITIES))
        assert (out_image[1, 3] == 0).all() and (out_image[0, 3] != 0).any()


def test_same_seed_same_result_other_seed_differs():
    image, regions = cube_batch()
    config = AugmentConfig().only(*PROBABILITIES)
    a = augment_batch(image, regions, 11, config)
    b = augment_batch(image, regions, 11, config)
    c = augment_batch(image, regions, 12, config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    before = image.clone()
    augment_batch(image, regions, 11, config)
    assert torch.equal(image, before)  # inputs untouched


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_gaussian_matches_scipy(mode):
    """Same filter as batchgenerators' scipy.ndimage.gaussian_filter (so alpha/sigma keep the
    published voxel units for the elastic field)."""
    x = np.random.default_rng(0).uniform(-1, 1, (3, 9, 24, 20)).astype(np.float32)
    for sigma in (0.7, 9.5):
        ours = _gaussian_blur(torch.from_numpy(x), sigma, mode).numpy()
        ref = np.stack([ndimage.gaussian_filter(c, sigma, mode=mode) for c in x])
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert _gaussian_matrix(5, 1.0, "reflect", "cpu").sum(1).allclose(torch.ones(5))


def test_intensity_formulas():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand((1, 4, 8, 16, 16), generator=gen) + 1
    regions = torch.zeros((1, 3, 8, 16, 16))
    mult = AugmentConfig(brightness_mult_range=(2.0, 2.0)).only("p_brightness_mult")
    torch.testing.assert_close(augment_batch(image, regions, 0, mult)[0], 2 * image)
    gamma = augment_batch(image, regions, 0, AugmentConfig().only("p_gamma"))[0]
    torch.testing.assert_close(gamma.mean((2, 3, 4)), image.mean((2, 3, 4)), atol=1e-4, rtol=0)
    torch.testing.assert_close(gamma.std((2, 3, 4)), image.std((2, 3, 4)), atol=1e-4, rtol=0)
    contrast = augment_batch(image, regions, 0, AugmentConfig().only("p_contrast"))[0]
    assert (contrast.amin((2, 3, 4)) >= image.amin((2, 3, 4))).all()
    assert (contrast.amax((2, 3, 4)) <= image.amax((2, 3, 4))).all()
    noise = AugmentConfig(noise_variance=(0.09, 0.09)).only("p_noise")
    residual = augment_batch(image, regions, 0, noise)[0] - image
    assert abs(residual.std().item() - 0.3) < 0.01


def test_fast_on_cpu():
    """Everything at once, the worst case (~0.1 s on one idle core); the bound is loose
    because the cores may be shared, and catches gross regressions only."""
    image, regions = cube_batch(shape=(32, 64, 64))
    config = AugmentConfig().only(*PROBABILITIES)
    augment_batch(image, regions, 0, config)
    start = time.perf_counter()
    for seed in range(3):
        augment_batch(image, regions, seed, config)
    assert (time.perf_counter() - start) / 3 < 1.0


def test_scale_factor_below_and_above_one_equally_often():
    # batchgenerators' SpatialTransform draws U(0.85, 1) or U(1, 1.25) with equal chance, not
    # U(0.85, 1.25) (which would shrink the sampling grid only 37.5 % of the time).
    draw = _Draw(0)
    factors = np.array([_draw_ranged_factor(draw, AugmentConfig().scale_range) for _ in range(4000)])
    assert factors.min() >= 0.85 and factors.max() <= 1.25
    assert abs((factors < 1).mean() - 0.5) < 0.03
    # augment_batch uses that draw: a grid scaled by s < 1 magnifies a centred cube.
    n = 400
    image = torch.zeros(n, 1, 12, 12, 12)
    image[:, :, 4:8, 4:8, 4:8] = 1
    regions = (image > 0).float()
    out, _ = augment_batch(image, regions, 0, AugmentConfig().only("p_scale"))
    magnified = (out.sum(dim=(1, 2, 3, 4)) > image[0].sum()).float().mean().item()
    assert abs(magnified - 0.5) < 0.075


# ---------------------------------------------- the transforms' maths and probabilities
def test_rotation_angles_stay_within_15_degrees(monkeypatch):
    seen = []
    real = aug._rotation_matrix
    monkeypatch.setattr(aug, "_rotation_matrix", lambda *a: seen.append(a) or real(*a))
    image, regions = torch.zeros(8, 1, 8, 8, 8), torch.zeros(8, 1, 8, 8, 8)
    aug.augment_batch(image, regions, 0, aug.AugmentConfig().only("p_rotation"))
    assert len(seen) == 8 and max(abs(a) for angles in seen for a in angles) <= np.radians(15)


def test_contrast_and_gamma_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert aug._contrast(x, 2.0).tolist() == [0.0, 0.5, 2.5, 3.0]
    y = aug._gamma(x, 2.0)
    out = torch.tensor([0.0, 1 / 3, 4 / 3, 3.0])   # ((x/3)**2)*3, then mean/std of x restored
    expected = (out - out.mean()) / out.std() * x.std() + x.mean()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=0)


def test_low_resolution_downsamples_by_the_zoom(monkeypatch):
    sizes = []
    real = aug.F.interpolate
    monkeypatch.setattr(aug.F, "interpolate", lambda x, size, **k: sizes.append(tuple(size)) or real(x, size=size, **k))
    aug._low_resolution(torch.rand(8, 16, 12), 0.5)
    assert sizes == [(4, 8, 6), (8, 16, 12)]


def test_probabilities_asked_in_order(monkeypatch):
    asked = []
    monkeypatch.setattr(aug._Draw, "happens", lambda self, p: asked.append(p) or True)
    image, regions = torch.rand(1, 2, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)
    aug.augment_batch(image, regions, 0)
    c = aug.AugmentConfig()
    assert asked == [c.p_elastic, c.p_rotation, c.p_scale, 0.5,          # 0.5: scale below/above 1
                     c.p_noise, c.p_blur, 0.5, 0.5, c.p_brightness_mult,
                     c.p_brightness_add, 0.5, 0.5, c.p_contrast, 0.5, 0.5,  # contrast factors
                     c.p_low_res, 0.5, 0.5, c.p_gamma, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_each_angle_rotates_about_its_own_axis():
    for k in range(3):
        angles = [0.0, 0.0, 0.0]
        angles[k] = 0.3
        m = aug._rotation_matrix(*angles).numpy()
        e = np.eye(3)[k]
        np.testing.assert_allclose(m @ e, e, atol=1e-12)
