import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from utils.inference import AVERAGES, gaussian_map, predict_subsets, sliding_window, window_starts
from utils.segment import segment


def constant(value, k=3):
    """A predict that returns `value` everywhere, K channels."""
    return lambda x: torch.full((x.shape[0], k) + tuple(x.shape[2:]), value)


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("mirror", [False, True])
def test_constant_prediction_is_reproduced_everywhere(gaussian, mirror):
    image = torch.randn(2, 20, 27, 33)
    out = sliding_window(constant(0.7), image, (8, 16, 16), gaussian=gaussian, mirror=mirror,
                         batch_size=3)
    assert out.shape == (3, 20, 27, 33) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 0.7), rtol=1e-6, atol=1e-6)


def test_gaussian_map_has_no_zeros_and_peaks_in_the_centre():
    g = gaussian_map((16, 32, 32))
    assert g.shape == (16, 32, 32)
    assert g.min() > 0
    assert g.max() == 1.0
    # symmetric under every flip (centred at (n-1)/2), so mirror TTA is unbiased
    for axes in [(0,), (1,), (2,)]:
        assert torch.equal(g, g.flip(axes))
    # sigma = n/8: one sigma from the centre along D the weight is exp(-1/2)
    g1 = gaussian_map((64, 8, 8))
    x = torch.arange(64) - 31.5
    expected = torch.exp(-0.5 * (x / 8.0) ** 2)
    expected = expected / expected.max()
    torch.testing.assert_close(g1[:, 3, 3] / g1[:, 3, 3].max(), expected.float(), rtol=1e-5,
                               atol=1e-6)


def test_window_starts_cover_and_clamp():
    # published tiling: step ceil(16 * 2/3) = 11 -> starts 0, 11, 22, then clamped 24
    assert window_starts(40, 16, 11) == [0, 11, 22, 24]
    assert window_starts(16, 16, 11) == [0]
    assert window_starts(27, 16, 11) == [0, 11]
    for size, window, step in itertools.product([16, 17, 31, 32, 33, 155], [16], [1, 5, 11, 16]):
        starts = window_starts(size, window, step)
        covered = set()
        for s in starts:
            assert 0 <= s <= size - window
            covered.update(range(s, s + window))
        assert covered == set(range(size))


def test_identity_is_reproduced_exactly():
    # integer values: sums and divisions of the overlapping copies are exact in float32
    image = torch.randint(-50, 50, (2, 23, 37, 41)).float()
    for mirror in (False, True):
        out = sliding_window(lambda x: x, image, (8, 16, 16), mirror=mirror)
        assert torch.equal(out, image)
    out = sliding_window(lambda x: x, torch.randn(1, 19, 21, 40), (8, 16, 16), gaussian=True)
    assert out.shape == (1, 19, 21, 40)


def test_volume_smaller_than_window_is_padded_and_cropped_back():
    image = torch.randint(1, 9, (1, 5, 40, 7)).float()  # no zeros inside the volume
    seen = []

    def predict(x):
        seen.append(x)
        return x * 2

    out = sliding_window(predict, image, (8, 16, 16), batch_size=1)
    assert torch.equal(out, image * 2)
    # H: starts 0, 11, 22, 24; D and W padded to one window each
    assert len(seen) == 4 and all(x.shape[2:] == (8, 16, 16) for x in seen)
    # the padding is zeros (the normalised background): 8*16*16 - 5*16*7 zeros per window
    assert all(int((x == 0).sum()) == 8 * 16 * 16 - 5 * 16 * 7 for x in seen)


def test_windows_are_batched_and_counted():
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        return x[:, :1]

    sliding_window(predict, torch.zeros(1, 40, 40, 40), (16, 16, 16), batch_size=5)
    # 4 starts per axis (0, 11, 22, 24) -> 64 windows in batches of 5
    assert sum(calls) == 64 and max(calls) == 5 and len(calls) == 13


def test_mirror_averages_the_eight_flips():
    # predict(x) = x + position along W: not flip-equivariant, so mirror must average
    def predict(x):
        w = torch.arange(x.shape[-1], dtype=torch.float32)
        return x + w

    image = torch.zeros(1, 8, 16, 16)
    out = sliding_window(predict, image, (8, 16, 16), mirror=True)
    # half the flips reverse W: average of w and (15 - w) = 7.5 everywhere
    torch.testing.assert_close(out, torch.full_like(out, 7.5))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_and_accumulates_in_float32(amp):
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    image = torch.randn(2, 12, 20, 20)
    ref = sliding_window(conv, image, (8, 16, 16))
    dtypes = []

    def predict(x):
        y = conv(x)
        dtypes.append(y.dtype)
        return y

    out = sliding_window(predict, image, (8, 16, 16), amp=amp)
    assert dtypes and set(dtypes) == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError):
        sliding_window(conv, image, (8, 16, 16), amp="fp8")


class TwoSubsetModel(torch.nn.Module):
    """forward_subsets -> (N, S, 3, d, h, w): logit = sum of the subset's channels; counts calls."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward_subsets(self, x, subsets):
        assert not self.training
        self.calls += 1
        outs = [x[:, list(s)].sum(1, keepdim=True).expand(-1, 3, -1, -1, -1) * self.scale
                for s in subsets]
        return torch.stack(outs, 1)


@pytest.mark.parametrize("average", AVERAGES)
def test_predict_subsets_runs_each_window_once_for_all_subsets(average):
    # every window predicts the same logit for a voxel: both averages give its sigmoid
    model = TwoSubsetModel().train()
    image = torch.randn(4, 10, 20, 24)
    probs = predict_subsets(model, image, [(0,), (1, 3)], (8, 16, 16), average, batch_size=1)
    assert model.training  # mode restored
    assert probs.shape == (2, 3, 10, 20, 24)
    assert model.calls == 2 * 2 * 2  # one call per window (batch_size=1), not per subset
    torch.testing.assert_close(probs[0], torch.sigmoid(image[0]).expand(3, -1, -1, -1))
    torch.testing.assert_close(probs[1], torch.sigmoid(image[1] + image[3]).expand(3, -1, -1, -1))


class LastColumnModel(torch.nn.Module):
    """forward_subsets -> logit 10 on a window's last column (w = 15 of 16), -2 elsewhere."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward_subsets(self, x, subsets):
        logits = torch.full((x.shape[0], len(subsets), 3) + tuple(x.shape[2:]), -2.0)
        logits[..., -1] = 10.0
        return logits


def test_windows_average_probabilities_as_published_export_or_logits_as_the_election():
    # W = 40, window 16, step 11: windows start at 0, 11, 22, 24. Voxel w = 26 is the last
    # column of the window at 11 and an inner one of the windows at 22 and 24: logits 10, -2, -2.
    image = torch.zeros(4, 8, 16, 40)
    model = LastColumnModel()
    sig = lambda v: 1 / (1 + torch.exp(-torch.tensor(v, dtype=torch.float64)))
    expected = {  # w: (mean of the sigmoids, sigmoid of the mean logit)
        0: (sig(-2.0), sig(-2.0)),  # one window
        15: ((sig(10.0) + sig(-2.0)) / 2, sig(4.0)),  # windows at 0 and 11
        26: ((sig(10.0) + 2 * sig(-2.0)) / 3, sig(2.0)),
        39: (sig(10.0), sig(10.0)),  # only the window at 24
    }
    for i, average in enumerate(AVERAGES):
        probs = predict_subsets(model, image, [(0,)], (8, 16, 16), average)
        assert probs.shape == (1, 3, 8, 16, 40)
        for w, values in expected.items():
            torch.testing.assert_close(probs[0, :, :, :, w],
                                       torch.full((3, 8, 16), values[i].item()), rtol=1e-6, atol=1e-6)
    # the masks differ at w = 26: 0.41 is no region, 0.88 is all three, BraTS label 4 (ET)
    args = dict(overlap=1 / 3, gaussian=False, batch_size=2, mirror=False, amp="off")
    published = segment(model, image, [(0,)], (8, 16, 16), SimpleNamespace(average="probabilities", **args),
                        torch.device("cpu"))[0]
    by_logits = segment(model, image, [(0,)], (8, 16, 16), SimpleNamespace(average="logits", **args),
                        torch.device("cpu"))[0]
    assert published[:, :, 26].max() == 0 and (by_logits[:, :, 26] == 4).all()
    assert (published[:, :, 15] == 4).all() and (by_logits[:, :, 15] == 4).all()


def test_predict_subsets_refuses_an_unknown_average():
    with pytest.raises(ValueError, match="average must be one of"):
        predict_subsets(LastColumnModel(), torch.zeros(4, 8, 16, 16), [(0,)], (8, 16, 16), "mean")


def test_gaussian_weights_the_windows_by_their_centre_distance():
    # W = 27, window 16, step 11: windows at 0 and 11, predicting 0 and 1 everywhere. Voxel w = 12
    # is 4.5 voxels from the first window's centre (7.5) and 6.5 from the second's; with sigma =
    # 16 / 8 = 2 the weights are exp(-4.5**2 / 8) and exp(-6.5**2 / 8) (the D and H factors cancel).
    values = iter([0.0, 1.0])
    predict = lambda x: torch.full((x.shape[0], 1) + tuple(x.shape[2:]), next(values))
    out = sliding_window(predict, torch.zeros(1, 8, 16, 27), (8, 16, 16), gaussian=True, batch_size=1)
    near, far = math.exp(-4.5 ** 2 / 8), math.exp(-6.5 ** 2 / 8)
    assert out[0, 4, 8, 12].item() == pytest.approx(far / (near + far), rel=1e-5)  # 0.0600
    assert out[0, 4, 8, 13].item() == pytest.approx(0.5, rel=1e-5)  # 5.5 from both centres
    uniform = iter([0.0, 1.0])
    out = sliding_window(lambda x: torch.full((x.shape[0], 1) + tuple(x.shape[2:]), next(uniform)),
                         torch.zeros(1, 8, 16, 27), (8, 16, 16), batch_size=1)
    assert out[0, 4, 8, 12].item() == 0.5


def test_a_small_volume_is_padded_centred_in_the_window():
    """Docstring: zero-padded (centred). D 5 -> 8: 1 before, 2 after; W 7 -> 16: 4 before, 5
    after."""
    img = torch.arange(1, 1 + 5 * 16 * 7, dtype=torch.float32).reshape(1, 5, 16, 7)
    seen = []
    sliding_window(lambda x: seen.append(x) or x, img, (8, 16, 16), batch_size=1)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0, 0, 1:6, :, 4:11], img[0])
    assert seen[0][0, 0, :1].abs().sum() == 0 and seen[0][0, 0, 6:].abs().sum() == 0
    assert seen[0][0, 0, :, :, :4].abs().sum() == 0 and seen[0][0, 0, :, :, 11:].abs().sum() == 0
