"""Patch sampler and PatchDataset: the published draws, crop-only reads, the device-side finish
(normalise, resize, flip) against the whole-volume path, determinism, DataLoader sizing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets.sampling as sampling
from datasets.normalize import normalization_params, normalize_image, normalize_published
from datasets.preprocess import CachedCase
from datasets.sampling import (IterationSampler, PatchDataset, PatchSampler, foreground_locations,
                               loader_options)
from utils.regions import labels_to_regions

CPU = torch.device("cpu")


def make_arrays(shape=(20, 40, 36), seed=0, dtype=np.int16):
    """Brain-like image (zero background around a block of ~30 grey levels per modality) and a
    label: edema box, core box inside, enhancing box inside that."""
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *shape), np.float32)
    block = (shape[0] - 4, shape[1] - 6, shape[2] - 8)
    count = min(30, np.prod(block) // 100)  # grey levels: each holds the 50 voxels it needs
    levels = rng.integers(100, 100 + count, (4, *block))
    image[:, 2:-2, 3:-3, 4:-4] = levels + np.arange(4)[:, None, None, None] * 200
    if dtype == np.float32:
        image[:, 2:-2, 3:-3, 4:-4] += 0.25  # not int16-representable: stored as float32
    label = np.zeros(shape, np.uint8)
    label[12:18, 28:36, 4:12] = 2  # inside the brain block (see the test of a label outside it)
    label[13:17, 30:34, 5:10] = 1
    label[14:16, 31:33, 6:8] = 4
    return image, label


def make_case(shape=(20, 40, 36), seed=0, dtype=np.int16, name="c0"):
    image, label = make_arrays(shape, seed, dtype)
    params = np.stack([normalization_params(channel) for channel in image])
    return CachedCase.from_arrays(name, image, label, params), image, label


def reference_patch(normalised, label, crop, patch):
    """The whole-volume path, computed independently: from the whole normalised image
    (published formula), cut the crop with zero padding, resize (trilinear image,
    centre-aligned nearest labels), flip."""
    pad = max(max(crop.sizes), max(normalised.shape[1:]))
    big_image = np.pad(normalised, [(0, 0)] + [(pad, pad)] * 3)
    big_label = np.pad(label, pad)
    window = tuple(slice(s + pad, s + pad + n) for s, n in zip(crop.starts, crop.sizes))
    x, lab = big_image[(slice(None), *window)], big_label[window]
    if tuple(crop.sizes) != tuple(patch):
        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None], size=patch,
                          mode="trilinear", align_corners=False)[0].numpy()
        index = [np.minimum(np.floor((np.arange(p) + 0.5) * n / p).astype(int), n - 1)
                 for n, p in zip(crop.sizes, patch)]
        lab = lab[np.ix_(*index)]
    regions = labels_to_regions(lab).astype(np.uint8)
    axes = [k + 1 for k in range(3) if crop.flips[k]]
    return np.flip(x, axes), np.flip(regions, axes)


def finish(dataset, indices):
    batch = torch.utils.data.default_collate([dataset[i] for i in indices])
    return dataset.to_device(batch, CPU)


@pytest.mark.parametrize("patch", [(8, 16, 16), (32, 48, 40)])  # inside the volume / larger
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_patches_equal_the_whole_volume_path(patch, dtype):
    case, image, label = make_case(dtype=dtype)
    assert case.raw.dtype == dtype
    dataset = PatchDataset([case], patch, seed=3, length=40)
    x, r = finish(dataset, range(40))
    assert x.shape == (40, 4, *patch) and x.dtype == torch.float32
    assert r.shape == (40, 3, *patch) and r.dtype == torch.uint8
    normalised = normalize_image(image, normalize_published)
    kinds = set()
    for i in range(40):
        crop = dataset.crop(i)[1]
        kinds.add((crop.sizes != patch, any(crop.flips)))
        want_x, want_r = reference_patch(normalised, label, crop, patch)
        assert np.array_equal(x[i].numpy().view(np.uint32), want_x.view(np.uint32))  # bit for bit
        assert np.array_equal(r[i].numpy(), want_r)
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


def test_mixed_int16_and_float32_cases_batch_together():
    cases = [make_case(seed=1)[0], make_case(seed=2, dtype=np.float32, name="c1")[0]]
    dataset = PatchDataset(cases, (8, 16, 16), seed=0, length=4)
    assert dataset[0]["image"].dtype == torch.float32  # int16 values are exact in float32
    x, _ = finish(dataset, range(4))
    for i in range(4):
        case, crop = dataset.crop(i)
        image, label = make_arrays(seed=1 if case.name == "c0" else 2,
                                   dtype=np.int16 if case.name == "c0" else np.float32)
        normalised = normalize_image(image, normalize_published)
        assert np.array_equal(x[i].numpy(), reference_patch(normalised, label, crop, (8, 16, 16))[0])


def test_larger_crop_is_zero_padded_and_keeps_all_content():
    case, image, _ = make_case(shape=(8, 16, 18))
    dataset = PatchDataset([case], (10, 20, 22), random_scale=False, random_mirror=False, length=1)
    x, _ = finish(dataset, [0])
    normalised = normalize_image(image, normalize_published)
    assert (x != 0).sum() == (normalised != 0).sum()  # the whole volume, surrounded by zeros
    assert np.array_equal(np.sort(x[x != 0].numpy()), np.sort(normalised[normalised != 0]))


def draws(sampler, shape, locations, n=400):
    return [sampler(shape, np.random.default_rng(seed), locations) for seed in range(n)]


EMPTY = tuple(np.zeros((0, 3), np.int32) for _ in range(3))


def test_random_crop_keeps_h_and_w_margins():
    crops = draws(PatchSampler((8, 20, 20), random_scale=False, random_mirror=False),
                  (20, 60, 50), EMPTY, n=200)
    starts = np.array([c.starts for c in crops])
    assert starts[:, 1].min() == 15 and starts[:, 1].max() == 60 - 15 - 20
    assert starts[:, 2].min() == 10 and starts[:, 2].max() == 50 - 10 - 20
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 12


def test_margins_clamp_on_small_volume():
    for crop in draws(PatchSampler((8, 20, 20), random_scale=False, random_mirror=False),
                      (10, 24, 22), EMPTY, n=50):
        assert all(0 <= s <= d - n for s, d, n in zip(crop.starts, (10, 24, 22), crop.sizes))


def test_scale_distribution():
    patch = (40, 80, 80)
    crops = draws(PatchSampler(patch, random_mirror=False), (60, 100, 100), EMPTY, n=2000)
    scaled = [c.sizes for c in crops if c.sizes != patch]
    assert abs(len(scaled) / 2000 - 0.5) < 0.04  # p = 0.5 (a draw of exactly 1.0 is negligible)
    ratios = np.array(scaled) / patch
    assert ratios.min() >= 0.9 - 1 / 40 and ratios.max() < 1.1
    assert ratios.min() < 0.92 and ratios.max() > 1.07  # the whole range is used
    assert max(max(c.sizes[k] for c in crops) for k in range(3)) <= max(PatchSampler(patch).max_size)


@pytest.mark.parametrize("voxel", [(10, 40, 40), (0, 79, 0)])  # inside, and in a corner
def test_foreground_crops_contain_the_region(monkeypatch, voxel):
    shape = (20, 80, 80)
    label = np.zeros(shape, np.uint8)
    label[voxel] = 4  # one ET voxel: ET = WT = TC = that voxel
    locations = foreground_locations(label)
    sampler = PatchSampler((6, 10, 10))

    def hit_rate(p_foreground):
        monkeypatch.setattr(sampling, "P_FOREGROUND", p_foreground)
        return np.mean([all(s <= v < s + n for s, v, n in zip(c.starts, voxel, c.sizes))
                        for c in draws(sampler, shape, locations)])

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
    _, label = make_arrays()
    locations = foreground_locations(label, max_per_region=50)
    regions = labels_to_regions(label)
    assert [len(l) for l in locations] == [8, 50, 50]
    for loc, mask in zip(locations, regions):
        assert mask[tuple(loc.T)].all()
    assert len(np.unique(locations[1], axis=0)) == 50
    empty = foreground_locations(np.zeros((4, 4, 4), np.uint8))
    assert all(l.shape == (0, 3) for l in empty)


def test_empty_regions_fall_back_to_random_crop():
    image, _ = make_arrays()
    label = np.zeros(image.shape[1:], np.uint8)
    params = np.stack([normalization_params(c) for c in image])
    case = CachedCase.from_arrays("empty", image, label, params)
    dataset = PatchDataset([case], (8, 16, 16), length=30)
    _, r = finish(dataset, range(30))
    assert not r.any()
    for i in range(30):  # random crops: the H margin (15, shrunk to what the volume allows)
        crop = dataset.crop(i)[1]
        assert crop.starts[1] >= min(15, (40 - crop.sizes[1]) // 2)


class SpyArray:
    """Array wrapper that records the size of every read, to prove only the crop is read."""

    def __init__(self, array):
        self.array, self.shape, self.ndim, self.dtype = array, array.shape, array.ndim, array.dtype
        self.reads = []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(out.size)
        return out


def test_reads_only_the_crop_and_memmap_matches_array(tmp_path):
    case, _, _ = make_case(shape=(40, 80, 72))
    np.save(tmp_path / "image.npy", case.raw)
    np.save(tmp_path / "label.npy", case.label)
    patch = (8, 16, 16)
    dataset = PatchDataset([case], patch, seed=1, length=30)
    on_disk = CachedCase(**{**vars(case), "raw": np.load(tmp_path / "image.npy", mmap_mode="r"),
                            "label": np.load(tmp_path / "label.npy", mmap_mode="r")})
    spy = CachedCase(**{**vars(case), "raw": SpyArray(on_disk.raw), "label": SpyArray(on_disk.label)})
    spied = PatchDataset([spy], patch, seed=1, length=30)
    mapped = PatchDataset([on_disk], patch, seed=1, length=30)
    max_crop = np.prod([int(p * 1.1) for p in patch])
    for i in range(30):
        for key, value in dataset[i].items():
            assert torch.equal(value, mapped[i][key]) and torch.equal(value, spied[i][key])
    assert 0 < max(spy.raw.reads) <= 4 * max_crop and max(spy.label.reads) <= max_crop
    assert case.raw.size > 40 * 4 * max_crop  # reading a whole case would show


def test_labels_stay_binary_and_move_with_the_image():
    case, image, label = make_case()
    image = image.copy()
    image[0] = np.where(label > 0, 1000, image[0])  # channel 0 bright where the tumour is
    params = np.stack([normalization_params(c) for c in image])
    dataset = PatchDataset([CachedCase.from_arrays("c", image, label, params)], (8, 16, 16),
                           seed=2, length=100)
    x, r = finish(dataset, range(100))
    assert set(np.unique(r)) <= {0, 1}
    seen = 0
    for xi, ri in zip(x, r):
        if ri[1].sum() > 20:  # WT present: the image's bright channel is high exactly there
            seen += 1
            assert xi[0][ri[1] == 1].mean() > 1.0 > xi[0][ri[1] == 0].mean()
    assert seen > 10


def test_flip_distribution():
    counts = {}
    for crop in draws(PatchSampler((4, 4, 4), random_scale=False), (4, 4, 4), EMPTY, n=2000):
        counts[crop.flips] = counts.get(crop.flips, 0) + 1
    assert len(counts) == 8
    assert abs(counts[(False, False, False)] / 2000 - 0.3) < 0.04
    for key, n in counts.items():
        if any(key):
            assert abs(n / 2000 - 0.1) < 0.03


def test_missing_label_is_an_error():
    image, _ = make_arrays()
    params = np.stack([normalization_params(c) for c in image])
    case = CachedCase.from_arrays("Brats18_X", image, None, params)
    with pytest.raises(ValueError, match="Brats18_X"):
        PatchDataset([case], (8, 8, 8))


def test_dataset_items_reproducible_and_order_independent():
    cases = [make_case(seed=k, name=f"c{k}")[0] for k in range(3)]
    ds = PatchDataset(cases, (8, 16, 16), seed=5, length=12)
    forward = finish(ds, range(12))
    fresh = PatchDataset(cases, (8, 16, 16), seed=5, length=12)
    order = [11, 3, 7, 0]  # a resumed run: any order, a fresh object
    again = finish(fresh, order)
    for k, i in enumerate(order):
        assert torch.equal(again[0][k], forward[0][i]) and torch.equal(again[1][k], forward[1][i])
    # each pass of n items visits every case once, in a seed-dependent order
    for e in range(4):
        assert sorted(ds.case_index(i) for i in range(3 * e, 3 * e + 3)) == [0, 1, 2]
    other = finish(PatchDataset(cases, (8, 16, 16), seed=6, length=12), range(12))
    assert not all(torch.equal(other[0][i], forward[0][i]) for i in range(12))
    assert len(ds) == 12 and len(PatchDataset(cases, (8, 8, 8))) == 3
    with pytest.raises(IndexError):
        ds[12]


def test_dataloader_workers_give_the_same_batches():
    cases = [make_case(seed=k, name=f"c{k}")[0] for k in range(2)]
    dataset = PatchDataset(cases, (8, 16, 16), seed=0, length=8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, **loader_options(1, CPU))
    for k, batch in enumerate(loader):
        x, r = dataset.to_device(batch, CPU)
        want = finish(dataset, [2 * k, 2 * k + 1])
        assert torch.equal(x, want[0]) and torch.equal(r, want[1])


def test_loader_options_sized_from_the_machine(monkeypatch):
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    auto = loader_options(-1, "cuda")
    assert auto == {"num_workers": sampling.AUTO_WORKERS_MAX, "pin_memory": True,
                    "persistent_workers": True, "prefetch_factor": 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPU processes share the 16 CPUs
    assert loader_options(-1, "cuda")["num_workers"] == 1
    assert loader_options(-1, "cuda")["prefetch_factor"] == sampling.IN_FLIGHT_BATCHES
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_options(-1, CPU) == {"num_workers": 0, "pin_memory": False}  # one CPU
    assert loader_options(3, CPU)["num_workers"] == 3  # an explicit count is kept


def test_iteration_sampler_continues_the_stream():
    full = list(IterationSampler(0, 4, batch_size=2, rank=1, world_size=2))
    assert full == [2, 3, 6, 7, 10, 11, 14, 15]
    assert list(IterationSampler(2, 4, 2, 1, 2)) == full[4:]


# ------------------------------------------------ the sampler's draws, by a scripted rng
class ScriptedRng:
    def __init__(self, randoms, integers):
        self.randoms, self.integers_out, self.integer_calls = list(randoms), list(integers), []

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, lo, hi):
        return 1.0

    def integers(self, *args):
        self.integer_calls.append(args)
        return self.integers_out.pop(0)


def one_voxel_locations():
    return tuple(np.array([[5, 20, 20]], np.int32) for _ in range(3))


@pytest.mark.parametrize("u, centred", [(0.49, True), (0.51, False)])
def test_foreground_probability_is_one_half(u, centred):
    sampler = sampling.PatchSampler((4, 8, 8), random_scale=False, random_mirror=False)
    rng = ScriptedRng([u], [0, 0] if centred else [0, 20, 20])  # choice ET, candidate 0 / starts
    crop = sampler((10, 60, 60), rng, one_voxel_locations())
    if centred:
        assert crop.starts == (3, 16, 16)
        assert rng.integer_calls[0] == (4,)    # ET, WT, TC or none: 4 choices
    else:
        assert crop.starts == (0, 20, 20)


@pytest.mark.parametrize("u, flipped", [(0.29, False), (0.31, True)])
def test_no_flip_probability_is_0_3(u, flipped):
    sampler = sampling.PatchSampler((4, 8, 8), random_scale=False, random_mirror=True)
    rng = ScriptedRng([0.99, u], [0, 0, 0, 7])
    crop = sampler((10, 60, 60), rng, one_voxel_locations())
    assert any(crop.flips) is flipped


def test_cache_keeps_labels_outside_every_modalitys_foreground():
    image, label = make_arrays()
    label[12:18, 34:40, 4:12] = 2                       # H 37..39: every modality is 0 there
    params = np.stack([normalization_params(c) for c in image])
    case = CachedCase.from_arrays("c", image, label, params)
    assert np.array_equal(case.full_label(), label)


def test_padding_normalises_to_zero_when_the_background_is_not_0():
    image, label = make_arrays(shape=(8, 16, 18))
    image[:, 0, 0, 0] = 20000                           # clipped to top: background = top
    params = np.stack([normalization_params(c) for c in image])
    case = CachedCase.from_arrays("c", image, label, params)
    ds = sampling.PatchDataset([case], (10, 20, 22), random_scale=False, random_mirror=False, length=3)
    x, _ = finish(ds, range(3))
    normalised = normalize_image(image, normalize_published)
    for i in range(3):
        want, _ = reference_patch(normalised, label, ds.crop(i)[1], (10, 20, 22))
        assert np.array_equal(x[i].numpy(), want)


def test_centred_start_by_hand():
    assert [sampling._centred_start(d, s, c) for d, s, c in zip((20, 60, 60), (6, 10, 10), (10, 30, 31))] == [7, 25, 26]
