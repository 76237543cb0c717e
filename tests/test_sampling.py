"""Patch sampler and PatchDataset: shapes, foreground centring, crop-only reads, determinism."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets.sampling as sampling
from datasets.sampling import PatchDataset, PatchSampler, foreground_locations
from utils.regions import labels_to_regions


def make_case(shape=(20, 40, 36), seed=0):
    """Random image; label: edema box, core box inside, enhancing box inside that."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((4, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[12:18, 28:36, 4:12] = 2
    label[13:17, 30:34, 5:10] = 1
    label[14:16, 31:33, 6:8] = 4
    return image, label


class SpyArray:
    """Array wrapper that records the size of every read, to prove only the crop is read."""

    def __init__(self, array):
        self.array, self.shape, self.ndim, self.dtype = array, array.shape, array.ndim, array.dtype
        self.reads = []

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(out.size)
        return out


def test_shapes_and_dtypes_patch_smaller_and_larger_than_volume():
    image, label = make_case()
    for patch in [(8, 16, 16), (32, 48, 40)]:  # inside the volume / larger on every axis
        sampler = PatchSampler(patch)
        for seed in range(20):
            x, r = sampler(image, label, np.random.default_rng(seed))
            assert x.shape == (4, *patch) and x.dtype == np.float32
            assert r.shape == (3, *patch) and r.dtype == np.uint8
            assert set(np.unique(r)) <= {0, 1}
            assert x.flags.c_contiguous and r.flags.c_contiguous


def test_larger_crop_is_zero_padded_and_keeps_all_content():
    image, label = make_case(shape=(6, 8, 8))
    image = np.abs(image) + 1  # nonzero everywhere inside the volume
    x, r = PatchSampler((10, 12, 12), random_scale=False, random_mirror=False)(
        image, label, np.random.default_rng(3))
    assert (x != 0).sum() == image.size  # the whole volume, surrounded by zeros
    assert np.isclose(x.sum(), image.sum())


def test_random_crop_keeps_h_and_w_margins(monkeypatch):
    image = np.zeros((4, 20, 60, 50), np.float32)
    label = np.zeros((20, 60, 50), np.uint8)
    starts = []
    real_read = sampling._read_crop
    monkeypatch.setattr(sampling, "_read_crop",
                        lambda v, s, n: (starts.append(s), real_read(v, s, n))[1])
    sampler = PatchSampler((8, 20, 20), random_scale=False, random_mirror=False)
    for seed in range(200):
        sampler(image, label, np.random.default_rng(seed))  # empty label: random crops only
    starts = np.array(starts[::2])  # image and label reads share the starts
    assert starts[:, 1].min() == 15 and starts[:, 1].max() == 60 - 15 - 20
    assert starts[:, 2].min() == 10 and starts[:, 2].max() == 50 - 10 - 20
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 12


def test_margins_clamp_on_small_volume():
    image, label = np.ones((4, 10, 24, 22), np.float32), np.zeros((10, 24, 22), np.uint8)
    sampler = PatchSampler((8, 20, 20), random_scale=False, random_mirror=False)
    for seed in range(50):
        x, _ = sampler(image, label, np.random.default_rng(seed))
        assert (x == 1).all()  # margins shrank, the crop still lies inside the volume


@pytest.mark.parametrize("voxel", [(10, 40, 40), (0, 79, 0)])  # inside, and in a corner
def test_foreground_crops_contain_the_region(monkeypatch, voxel):
    image = np.zeros((4, 20, 80, 80), np.float32)
    label = np.zeros(image.shape[1:], np.uint8)
    label[voxel] = 4  # one ET voxel: ET = WT = TC = that voxel
    locations = foreground_locations(label)
    sampler = PatchSampler((6, 10, 10))

    def hit_rate(p_foreground):
        monkeypatch.setattr(sampling, "P_FOREGROUND", p_foreground)
        return np.mean([sampler(image, label, np.random.default_rng(s), locations)[1].any()
                        for s in range(400)])

    # forced: 3 of the 4 choices centre on the voxel (always kept), "none" is a random crop
    forced, random_only = hit_rate(1.0), hit_rate(0.0)
    assert forced > 0.68 and random_only < 0.1
    monkeypatch.undo()
    assert random_only < hit_rate(sampling.P_FOREGROUND) < forced


def test_centred_crop_is_shifted_inside_and_covers_the_voxel():
    dims, size = (20, 40, 36), (6, 10, 10)
    for centre in [(0, 0, 0), (19, 39, 35), (10, 20, 18), (2, 38, 5)]:
        starts = [sampling._centred_start(d, s, c) for d, s, c in zip(dims, size, centre)]
        assert all(0 <= st <= d - s for st, d, s in zip(starts, dims, size))
        assert all(st <= c < st + s for st, c, s in zip(starts, centre, size))
    # a crop larger than the axis contains the whole axis
    assert sampling._centred_start(8, 12, 7) in range(-4, 1)


def test_foreground_locations_sampled_and_capped():
    _, label = make_case()
    locations = foreground_locations(label, max_per_region=50)
    regions = labels_to_regions(label)
    assert [len(l) for l in locations] == [8, 50, 50]
    for loc, mask in zip(locations, regions):
        assert mask[tuple(loc.T)].all()
    assert len(np.unique(locations[1], axis=0)) == 50
    empty = foreground_locations(np.zeros((4, 4, 4), np.uint8))
    assert all(l.shape == (0, 3) for l in empty)


def test_empty_regions_fall_back_to_random_crop():
    image, _ = make_case()
    label = np.zeros(image.shape[1:], np.uint8)
    sampler = PatchSampler((8, 16, 16))
    for seed in range(30):
        _, r = sampler(image, label, np.random.default_rng(seed), foreground_locations(label))
        assert not r.any()


def test_reads_only_the_crop_and_memmap_matches_array(tmp_path):
    image, label = make_case()
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "label.npy", label)
    image_mm = np.load(tmp_path / "image.npy", mmap_mode="r")
    label_mm = np.load(tmp_path / "label.npy", mmap_mode="r")
    locations = foreground_locations(label)
    patch = (8, 16, 16)
    sampler = PatchSampler(patch)
    max_crop = 4 * np.prod([int(p * 1.1) for p in patch])
    for seed in range(30):
        a = sampler(image, label, np.random.default_rng(seed), locations)
        b = sampler(image_mm, label_mm, np.random.default_rng(seed), locations)
        spy_image, spy_label = SpyArray(image_mm), SpyArray(label_mm)
        c = sampler(spy_image, spy_label, np.random.default_rng(seed), locations)
        for x, y, z in zip(a, b, c):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
        assert max(spy_image.reads) <= max_crop and max(spy_label.reads) <= max_crop / 4


def test_rescale_and_flips_keep_labels_binary_and_consistent():
    image, label = make_case()
    image = image.copy()
    image[0] = label  # channel 0 carries the label: the image must move with the regions
    sampler = PatchSampler((8, 16, 16))
    locations = foreground_locations(label)
    for seed in range(100):
        x, r = sampler(image, label, np.random.default_rng(seed), locations)
        assert set(np.unique(r)) <= {0, 1}
        if r[1].sum() > 20:  # WT present: the image's label channel is high where WT is
            assert x[0][r[1] == 1].mean() > 1.0 > x[0][r[1] == 0].mean()


def test_flip_distribution():
    image, label = make_case(shape=(4, 4, 4))
    image = np.arange(image.size, dtype=np.float32).reshape(image.shape)
    sampler = PatchSampler((4, 4, 4), random_scale=False)
    counts = {}
    for seed in range(2000):
        x, _ = sampler(image, label, np.random.default_rng(seed))
        key = tuple(bool(np.diff(x[0], axis=a).ravel()[0] < 0) for a in range(3))  # flipped axes
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 8
    assert abs(counts[(False, False, False)] / 2000 - 0.3) < 0.04
    for key, n in counts.items():
        if any(key):
            assert abs(n / 2000 - 0.1) < 0.03


def test_same_seed_same_output_different_seed_differs():
    image, label = make_case()
    sampler = PatchSampler((8, 16, 16))
    a = sampler(image, label, np.random.default_rng(7))
    b = sampler(image, label, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    others = [sampler(image, label, np.random.default_rng(s))[0] for s in range(8, 12)]
    assert not any(np.array_equal(a[0], o) for o in others)


def test_missing_label_is_an_error():
    image, _ = make_case()
    with pytest.raises(ValueError, match="label"):
        PatchSampler((8, 8, 8))(image, None, np.random.default_rng(0))
    case = SimpleNamespace(name="Brats18_X", image=image, label=None)
    with pytest.raises(ValueError, match="Brats18_X"):
        PatchDataset([case], (8, 8, 8))


def test_dataset_items_reproducible_and_order_independent():
    cases = [SimpleNamespace(name=f"c{k}", image=make_case(seed=k)[0], label=make_case()[1])
             for k in range(3)]
    ds = PatchDataset(cases, (8, 16, 16), seed=5, length=12)
    forward = [ds[i] for i in range(12)]
    fresh = PatchDataset(cases, (8, 16, 16), seed=5, length=12)
    for i in [11, 3, 7, 0]:  # a resumed run: any order, a fresh object
        x, r = fresh[i]
        assert x.dtype == torch.float32 and r.dtype == torch.uint8
        assert x.shape == (4, 8, 16, 16) and r.shape == (3, 8, 16, 16)
        assert torch.equal(x, forward[i][0]) and torch.equal(r, forward[i][1])
    # each pass of n items visits every case once, in a seed-dependent order
    for e in range(4):
        assert sorted(ds.case_index(i) for i in range(3 * e, 3 * e + 3)) == [0, 1, 2]
    other = PatchDataset(cases, (8, 16, 16), seed=6, length=12)
    assert not all(torch.equal(other[i][0], forward[i][0]) for i in range(12))
    assert len(ds) == 12 and len(PatchDataset(cases, (8, 8, 8))) == 3
    with pytest.raises(IndexError):
        ds[12]
