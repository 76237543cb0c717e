"""Published intensity normalisation: hand-computed values and fast == reference, bit for bit."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datasets.brats import CaseError
from datasets.normalize import (
    MAX_BINS,
    NormalizationError,
    _bin_indices,
    _top_bin,
    apply_normalization,
    normalization_params,
    normalize,
    normalize_case,
    normalize_image,
    normalize_published,
)


def same_bits(a, b):
    """Both float32 and equal bit for bit (-0.0 is not 0.0); test_preprocess uses it too."""
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def applied(v):
    """The torch twin on the whole volume, with the volume's parameters."""
    v = np.asarray(v, np.float32)
    return apply_normalization(torch.from_numpy(v), torch.from_numpy(normalization_params(v))).numpy()


def brats_like(seed, shape=(40, 48, 36), outliers=True):
    """int16 brain-like volume: zero background, tissue ~N(600, 150), a few bright outliers."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.int16)
    core = rng.normal(600, 150, (shape[0] - 8, shape[1] - 8, shape[2] - 6))
    vol[4:-4, 4:-4, 3:-3] = np.clip(core, 1, None).round().astype(np.int16)
    if outliers:  # sparse bright voxels far above the tissue: top ends well below max
        idx = tuple(rng.integers(4, s - 4, 30) for s in shape)
        vol[idx] = rng.integers(3000, 30000, 30).astype(np.int16)
    return vol


def test_hand_computed_example():
    v = np.zeros((10, 10, 10), np.float32)
    flat = v.reshape(-1)
    flat[1:301] = 5  # 300 voxels at 5, 100 at 10, 30 at 20 (< 50: not a full bin)
    flat[301:401] = 10
    flat[401:431] = 20
    # int(20) = 20 one-unit bins over [0, 20]: the last bin holding >= 50 voxels is 10.
    fg = np.array([5.0] * 300 + [10.0] * 130)  # 20 clipped to 10; background 0 excluded
    expected = np.zeros(1000)
    expected[1:431] = (fg - fg.mean()) / fg.std()
    for fn in (normalize_published, normalize):
        out = fn(v)
        assert out.dtype == np.float32 and out.shape == v.shape
        np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    fg32 = fg.astype(np.float32)  # in the reference's order: v[mask] after clipping
    assert normalization_params(v).tolist() == [10, 0, fg32.mean(), fg32.std()]


def test_params_of_a_corner_above_top():
    v = brats_like(2)
    v[0, 0, 0] = 20000  # clipped to top, then the background value
    top, background, mean, std = normalization_params(v)
    assert background == top < 20000
    fg = v[v < top].astype(np.float32)  # every voxel clipping leaves below top
    assert (mean, std) == (fg.mean(), fg.std())


@pytest.mark.parametrize("seed", range(4))
def test_fast_equals_published_brats_like_int16(seed):
    v = brats_like(seed, outliers=seed % 2 == 0)
    reference = normalize_published(v)
    assert same_bits(normalize(v), reference) and same_bits(applied(v), reference)


@pytest.mark.parametrize("corner", [20000, 800, 600, 1])  # top is 800
def test_fast_equals_published_any_corner(corner):
    # A corner above `top` is clipped to it before it becomes the background value.
    v = brats_like(5)
    v[0, 0, 0] = corner
    reference = normalize_published(v)
    assert same_bits(normalize(v), reference) and same_bits(applied(v), reference)


SHAPE = (40, 48, 36)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: (r.gamma(20.0, 15.0, SHAPE) + 0.25).astype(np.float32),  # float, corner not 0
        lambda r: r.normal(300, 120, SHAPE).astype(np.float32),  # negative minimum
        lambda r: np.where(  # dense tissue at ~2000, a sparse float tail up to 70000
            r.random(SHAPE) < 0.7, r.normal(2000, 20, SHAPE), r.random(SHAPE) * 7e4
        ).astype(np.float32),
        lambda r: np.where(r.random(SHAPE) < 0.5, 0, r.integers(1, 40, SHAPE)).astype(np.float32),
    ],
    ids=["float-gamma", "negative-min", "wide-sparse-tail", "few-levels"],
)
def test_fast_equals_published_float_volumes(make):
    v = make(np.random.default_rng(7))
    reference = normalize_published(v)
    assert same_bits(normalize(v), reference) and same_bits(applied(v), reference)


def test_top_bin_every_path_matches_histogram():
    rng = np.random.default_rng(3)
    # Dense low values, sparse high ones: the quantile thresholds find no full bin above
    # them, so the search falls back down to the full count.
    v = np.concatenate([rng.integers(0, 20, 5000), rng.permutation(np.arange(20, 9000))]).astype(np.float32)
    for vol in (v, brats_like(1).astype(np.float32).reshape(-1)):
        n = int(vol.max())
        hist, edges = np.histogram(vol, n)
        assert _top_bin(vol, edges) == np.nonzero(hist >= 50)[0][-1]


def test_bin_indices_reproduce_numpy_histogram():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scale = rng.choice([1.0, 3.3, 1e3, 7e4])
        x = (rng.random(3000) * scale + rng.choice([0.0, -50.0, 1e4, 0.5])).astype(np.float32)
        if rng.random() < 0.5:
            x = np.round(x)
        n = int(x.max())
        if n < 1 or n > 1000 * (x.max() - x.min()):  # numpy refuses bins narrower than a float step
            continue
        hist, edges = np.histogram(x, n)
        np.testing.assert_array_equal(np.bincount(_bin_indices(x, edges), minlength=n), hist)


@pytest.mark.parametrize(
    "v",
    [
        np.zeros((8, 8, 8), np.float32),  # max 0: zero bins
        np.full((8, 8, 8), 0.7, np.float32),  # max < 1
        np.where(np.arange(512).reshape(8, 8, 8) == 100, np.nan, 5).astype(np.float32),
        np.arange(40, dtype=np.float32).reshape(2, 4, 5),  # no bin holds 50 voxels
        np.pad(np.full((6, 6, 6), 9, np.float32), 1),  # constant foreground: std 0
        np.random.default_rng(0).uniform(0.05, 1.9, (8, 8, 8)).astype(np.float32),  # one bin:
        # top = 0, everything is clipped to the corner value, no foreground is left
    ],
    ids=["zeros", "max-below-1", "nan", "no-full-bin", "constant-foreground", "max-below-2"],
)
def test_degenerate_volumes_raise_in_both(v):
    for fn in (normalize_published, normalize):
        with pytest.raises(NormalizationError):
            fn(v)


def test_a_constant_volume_is_named_as_such():
    for fn in (normalize_published, normalize):
        with pytest.raises(NormalizationError) as error:
            fn(np.full((24, 20, 16), 300, np.int16))
        assert str(error.value) == "every voxel is 300: a constant volume (an empty modality?)"
        # a constant foreground (a brain mask saved as a scan) says what to do, too
        with pytest.raises(NormalizationError) as error:
            fn(np.pad(np.full((6, 6, 6), 100, np.float32), 1))
        assert str(error.value) == (
            "foreground is constant (99, clipped at 99 as published): its std is 0: not an MRI "
            "scan (a mask, a placeholder)? Give the scan; if the modality is missing, training "
            "needs all four modalities: drop the case from the list (eval.py and predict.py read "
            "the case without it)")


@pytest.mark.parametrize("spike, shown", [(3e7, "30000000"), (2e9, "2e+09"), (3e38, "3e+38")])
def test_a_spike_beyond_the_histogram_bound_is_refused_in_both(spike, shown):
    # numpy refused 3e7 ('Too many bins') and 3e38 ('Maximum allowed size'); 2e9 asked for 7.45 GiB.
    v = brats_like(0).astype(np.float32)
    v[5, 5, 5] = spike
    message = (f"volume maximum {shown} is above 16777216 (2**24), the most one-unit histogram "
               "bins allowed: a stray bright voxel, or intensities not on the scanner's scale? "
               "Check the file, or rescale it to the scanner's range (BraTS: int16)")
    for fn in (normalize_published, normalize, normalization_params):
        with pytest.raises(NormalizationError) as info:
            fn(v)
        assert str(info.value) == message


def test_a_narrow_range_far_from_zero_is_refused_in_both():
    # int(max) = 5000 bins over [5000, 5000.5]: narrower than float32's spacing there, which
    # numpy refused with a bare ValueError ('Too many bins for data range').
    v = (5000 + np.random.default_rng(0).random((20, 20, 20)) * 0.5).astype(np.float32)
    for fn in (normalize_published, normalize, normalization_params):
        with pytest.raises(NormalizationError) as info:
            fn(v)
        assert str(info.value).startswith(
            f"intensities span only [{v.min():.8g}, {v.max():.8g}]: the published histogram's "
            "5000 bins of that range are finer than float32 can tell apart (Too many bins")
        assert str(info.value).endswith("not a rescaled image")


def test_a_spike_at_the_histogram_bound_is_normalised_as_published():
    v = brats_like(0).astype(np.float32)
    v[5, 5, 5] = MAX_BINS  # 2**24 one-unit bins: the most allowed
    reference = normalize_published(v)
    assert same_bits(normalize(v), reference) and same_bits(applied(v), reference)


def test_normalize_image_per_modality():
    image = np.stack([brats_like(s) for s in range(4)]).astype(np.float32)
    image[2] *= 3  # modalities are normalised independently
    out = normalize_image(image)
    assert out.shape == image.shape and out.dtype == np.float32
    for c in range(4):
        assert same_bits(out[c], normalize_published(image[c]))
        fg = out[c][image[c] != 0]
        assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3


def test_normalize_case_leaves_missing_modalities_zero():
    # An all-zero channel would fail the published formula (0 bins); a missing modality's
    # channel is not normalised and stays zero, which is how the network reads "missing".
    image = np.stack([brats_like(0), np.zeros((40, 48, 36), np.int16), brats_like(2),
                      np.zeros((40, 48, 36), np.int16)]).astype(np.float32)
    case = SimpleNamespace(name="X", image=image, available=(0, 2),
                           files={"flair": Path("X_flair.nii.gz"), "t1ce": Path("X_t1ce.nii.gz")})
    out = normalize_case(case)
    assert same_bits(out[0], normalize(image[0])) and same_bits(out[2], normalize(image[2]))
    assert not out[1].any() and not out[3].any()
    case.available, case.files["t1"] = (0, 1, 2), Path("X_t1.nii.gz")  # an all-zero T1 file
    with pytest.raises(CaseError, match="case X: X_t1.nii.gz: cannot normalise: every voxel is 0: "
                       "an empty volume, such as the placeholder of a missing modality"):
        normalize_case(case)
    image[1, 5:10, 5:10, 5:10] = 0.5  # a maximum below 1: no one-unit bin
    with pytest.raises(CaseError, match="case X: X_t1.nii.gz: cannot normalise: volume maximum 0.5 < 1"):
        normalize_case(case)


def test_an_image_without_a_level_of_50_voxels_is_explained():
    # Scaled to [0, 1]: one histogram bin, so the published clip value is 0 and every voxel
    # becomes background.
    v = brats_like(0).astype(np.float32)
    v /= v.max()
    case = SimpleNamespace(name="X", image=np.stack([v] * 4), available=(0,),
                           files={"flair": Path("X_flair.nii.gz")})
    message = ("case X: X_flair.nii.gz: cannot normalise: clipped at 0 as published (the last "
               "intensity level holding 50 voxels), every voxel equals the background: no level "
               "above the background holds 50 voxels (e.g. a float image scaled to [0, 1]); use "
               "the scanner's intensities (as BraTS's int16 files), not a rescaled image")
    with pytest.raises(CaseError) as info:
        normalize_case(case)
    assert str(info.value) == message
    with pytest.raises(NormalizationError) as info:
        normalize_published(v)
    assert f"cannot normalise: {info.value}" == message.split(": ", 2)[2]


def test_a_2d_slice_or_an_almost_empty_volume_is_named_as_such():
    # Not a float image scaled to [0, 1]: too few voxels for any of their intensity levels to
    # hold 50 (a 64 x 64 slice over 800 levels; 27 voxels)
    rng = np.random.default_rng(0)
    slice_2d = np.zeros((1, 64, 64), np.float32)  # network order of a (64, 64, 1) file
    slice_2d[0, 8:-8, 8:-8] = rng.integers(100, 900, (48, 48))
    almost_empty = np.zeros((40, 48, 36), np.float32)
    almost_empty[5:8, 5:8, 5:8] = 300
    start = ("case X: X_flair.nii.gz: cannot normalise: clipped at 0 as published (the last "
             "intensity level holding 50 voxels), every voxel equals the background: no level "
             "above the background holds 50 voxels; ")
    for v, cause in (
            (slice_2d, "a dimension of size 1: a 2-D slice? BraTS cases are 3-D volumes; give "
                       "the whole volume"),
            (almost_empty, "only 27 voxels differ from the background, over 300 intensity "
                           "levels: too few to normalise (an almost empty volume?); check that "
                           "the file holds the whole scan")):
        case = SimpleNamespace(name="X", image=v[None], available=(0,),
                               files={"flair": Path("X_flair.nii.gz")})
        with pytest.raises(CaseError) as info:
            normalize_case(case)
        assert str(info.value) == start + cause
        with pytest.raises(NormalizationError) as info:
            normalize_published(v)
        assert f"cannot normalise: {info.value}" == (start + cause).split(": ", 2)[2]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="training crops are normalised on CUDA: GPU only"))])
@pytest.mark.parametrize("corner", [0, 20000])
def test_apply_to_int16_crops_equals_the_whole_volume(corner, device):
    """The cache stores int16 source values and PARAMS; any crop normalised in torch, on the
    training device, must be bit for bit the same crop of the whole volume normalised on the
    CPU (by the published formula)."""
    volumes = np.stack([brats_like(s) for s in (1, 2)])  # (2, D, H, W) int16
    volumes[:, 0, 0, 0] = corner
    params = np.stack([normalization_params(v) for v in volumes])
    whole = normalize_image(volumes, normalize_published)
    for crop in [np.s_[:, 5:30, 0:48, 7:9], np.s_[:, 0:1, 0:1, 0:1], np.s_[:, 20:40, 40:48, 30:36]]:
        x = torch.from_numpy(volumes[crop]).float().to(device)
        out = apply_normalization(x, torch.from_numpy(params).to(device)).cpu().numpy()  # (2, ...) with (2, 4)
        assert same_bits(out, whole[crop])
    batch = torch.from_numpy(np.stack([volumes, volumes[::-1]])).float()  # (B, C, D, H, W)
    params_batch = torch.from_numpy(np.stack([params, params[::-1]]))  # (B, C, 4)
    out = apply_normalization(batch, params_batch).numpy()
    assert same_bits(out[0], whole) and same_bits(out[1], np.ascontiguousarray(whole[::-1]))


def test_a_bin_of_exactly_50_voxels_is_full():
    v = np.zeros((10, 10, 10), np.float32)
    flat = v.reshape(-1)
    flat[1:301], flat[301:351], flat[351:381] = 5, 10, 20   # 50 voxels at 10
    assert normalization_params(v)[0] == 10                 # '>' instead of '>=' gives 5
    fg = np.array([5.0] * 300 + [10.0] * 80, np.float32)
    assert normalize_published(v).reshape(-1)[1:381] == pytest.approx((fg - fg.mean()) / fg.std(), rel=1e-5)
