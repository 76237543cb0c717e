"""nnU-Net-style batch augmentation in torch, on the batch's device (the GPU in training).

augment_batch(image (B, 4, d, h, w), regions (B, 3, d, h, w), seed) applies, per sample and
in this order, with the published probabilities (AugmentConfig defaults):
  spatial   elastic deformation (alpha 0-900, sigma 9-13 voxels) p 0.2, rotation ±15° about
            each axis p 0.2, scaling 0.85-1.25 p 0.2: ONE sampling grid per sample (voxel
            coordinates + smooth displacement, rotated, scaled), one grid_sample: trilinear
            for the image, zero padding; each region map interpolated linearly and
            thresholded at 0.5 (as batchgenerators does for segmentations), zero padding, so
            labels stay exactly binary and aligned with the image;
  noise     Gaussian, variance U(0, 0.1) (std = sqrt(variance)) p 0.1;
  blur      Gaussian σ U(0.5, 1) per channel with p 0.5, p 0.2;
  brightness multiplicative U(0.75, 1.25) per channel p 0.15; additive N(0, 0.1) per channel
            (each with p 0.5) p 0.15;
  contrast  U(0.75, 1.25) per channel around the channel mean, range preserved, p 0.15;
  low res   per channel (p 0.5) downsample by zoom U(0.5, 1) (nearest) and upsample back
            (trilinear) p 0.25;
  gamma     U(0.7, 1.5) per channel on the min-max-scaled channel, mean/std restored, p 0.15;
  mirror    each spatial axis with p 0.5.
Differences from batchgenerators, on purpose: labels are never padded with -1 (padding is
background); cubic interpolation becomes trilinear (torch has no 3D cubic); batchgenerators
passes the noise "variance" as the standard deviation, we use its square root.

All-zero channels: a channel that is all zero on input (a crop of pure background, where
normalisation left exactly 0) is exactly zero on output — noise and brightness would otherwise
make it nonzero. (Missing modalities are not zeroed here: train.py augments all four and the
model drops the ones a subset lacks.)

Determinism: per-sample parameters come from a CPU torch.Generator seeded with `seed`; noise
fields from a generator on the batch's device seeded from it. Same seed, same device, same
result.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from utils import speed


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per sample unless named per channel) and ranges; defaults = published."""
    p_elastic: float = 0.2
    elastic_alpha: tuple = (0.0, 900.0)  # displacement scale, voxels (batchgenerators units)
    elastic_sigma: tuple = (9.0, 13.0)  # Gaussian smoothing of the noise field, voxels
    p_rotation: float = 0.2
    rotation_degrees: float = 15.0  # each axis U(-r, r)
    p_scale: float = 0.2
    scale_range: tuple = (0.85, 1.25)  # sampling coordinates are multiplied by it
    p_noise: float = 0.1
    noise_variance: tuple = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    blur_sigma: tuple = (0.5, 1.0)
    p_brightness_mult: float = 0.15
    brightness_mult_range: tuple = (0.75, 1.25)
    p_brightness_add: float = 0.15
    p_brightness_add_channel: float = 0.5
    brightness_add_std: float = 0.1
    p_contrast: float = 0.15
    contrast_range: tuple = (0.75, 1.25)
    p_low_res: float = 0.25
    p_low_res_channel: float = 0.5
    low_res_zoom: tuple = (0.5, 1.0)
    p_gamma: float = 0.15
    gamma_range: tuple = (0.7, 1.5)
    p_mirror_axis: float = 0.5

    def only(self, *names):
        """This config with every probability 0 except the named ones (set to 1), for tests
        and ablations, e.g. AugmentConfig().only("p_rotation"); with no name, augment_batch
        returns its inputs unchanged."""
        off = {f.name: 0.0 for f in fields(self) if f.name.startswith("p_") and f.name not in names}
        return replace(self, **off, **{n: 1.0 for n in names})  # a wrong name: TypeError


def _gaussian_matrix(n, sigma, mode, device):
    """(n, n) matrix M with (M @ x) = 1-D Gaussian filter of x, like scipy.ndimage's
    gaussian_filter1d (kernel truncated at 4 sigma) with mode "constant" (zeros outside) or
    "reflect" (d c b a | a b c d | d c b a). A dense matmul per axis is fast for patch sides
    (<= a few hundred voxels) and, unlike conv3d, does not depend on cuDNN algorithm choice."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    rows = torch.arange(n).repeat_interleave(len(offsets))
    cols = rows + offsets.long().repeat(n)
    weights = kernel.repeat(n)
    if mode == "constant":
        keep = (cols >= 0) & (cols < n)
        rows, cols, weights = rows[keep], cols[keep], weights[keep]
    else:
        period = 2 * n  # reflect: fold into [0, 2n), then mirror the upper half
        cols = cols % period
        cols = torch.where(cols >= n, period - 1 - cols, cols)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.index_put_((rows, cols), weights, accumulate=True)
    return speed.to_device(matrix.to(torch.float32), device)


def _gaussian_blur(x, sigma, mode):
    """Separable Gaussian filter of the last 3 axes of x (..., d, h, w), sigma in voxels."""
    for axis in (-3, -2, -1):
        matrix = _gaussian_matrix(x.shape[axis], sigma, mode, x.device)
        x = torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)
    return x


def _rotation_matrix(ax, ay, az):
    """3x3 rotation about the d, h and w axes (angles in radians), composed d, then h, then w."""
    def rot(a, i, j):
        m = torch.eye(3, dtype=torch.float64)
        m[i, i], m[i, j], m[j, i], m[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        return m
    return rot(az, 0, 1) @ rot(ay, 0, 2) @ rot(ax, 1, 2)


class _Draw:
    """Scalar random draws from a CPU generator (per-sample parameters)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand((), generator=self.gen, dtype=torch.float64).item()

    def happens(self, p):
        return self.uniform() < p

    def normal(self, std):
        return std * torch.randn((), generator=self.gen, dtype=torch.float64).item()


def _spatial(image, regions, cfg, draw, field_gen):
    """One sampling grid (elastic + rotation + scaling) per sample, one grid_sample each.

    image (C, d, h, w), regions (R, d, h, w) float. Returns both, or None when no spatial
    transform is drawn (the identity, kept exact by not resampling at all).
    """
    elastic = draw.happens(cfg.p_elastic)
    alpha, sigma = draw.uniform(*cfg.elastic_alpha), draw.uniform(*cfg.elastic_sigma)
    rotate = draw.happens(cfg.p_rotation)
    r = math.radians(cfg.rotation_degrees)
    angles = [draw.uniform(-r, r) for _ in range(3)]
    scale_on = draw.happens(cfg.p_scale)
    scale = _draw_ranged_factor(draw, cfg.scale_range)  # below / above 1 equally often
    if not (elastic or rotate or scale_on):
        return None

    shape = image.shape[1:]
    device = image.device
    # Voxel coordinates relative to the patch centre, (3, d, h, w), axes in (d, h, w) order.
    axes = [torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2 for n in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    if elastic:
        # batchgenerators: displacement = gaussian_filter(U(-1, 1) noise, sigma) * alpha, voxels.
        noise = torch.rand((3, *shape), generator=field_gen, device=device) * 2 - 1
        coords = coords + _gaussian_blur(noise, sigma, "constant") * alpha
    matrix = torch.eye(3, dtype=torch.float64)
    if rotate:
        matrix = _rotation_matrix(*angles)
    if scale_on:
        matrix = matrix * scale
    if rotate or scale_on:
        coords = torch.einsum("ij,jdhw->idhw", speed.to_device(matrix.to(torch.float32), device), coords)
    # grid_sample wants (x, y, z) = (w, h, d) in [-1, 1] (align_corners: -1/1 = edge voxel centres).
    sizes = speed.to_device([(n - 1) / 2 if n > 1 else 1.0 for n in shape], device, torch.float32)
    grid = (coords / sizes.view(3, 1, 1, 1)).flip(0).permute(1, 2, 3, 0)[None]
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=True)[0]
    regions = F.grid_sample(regions[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0]
    return image, (regions >= 0.5).to(regions.dtype)


def _low_resolution(channel, zoom):
    """Downsample (nearest) by `zoom` and upsample back (trilinear): (d, h, w) -> same."""
    shape = channel.shape
    small = [max(1, round(n * zoom)) for n in shape]
    x = F.interpolate(channel[None, None], size=small, mode="nearest")
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]


def _contrast(channel, factor):
    mean, lo, hi = channel.mean(), channel.min(), channel.max()
    return ((channel - mean) * factor + mean).clamp(lo, hi)


def _gamma(channel, gamma, eps=1e-7):
    """x -> ((x - min) / range) ** gamma * range + min, then the mean and std are restored."""
    mean, std = channel.mean(), channel.std()
    lo = channel.min()
    span = channel.max() - lo
    out = ((channel - lo) / (span + eps)) ** gamma * span + lo
    return (out - out.mean()) / (out.std() + 1e-8) * std + mean


def _draw_ranged_factor(draw, low_high):
    """batchgenerators' scale/contrast/gamma factor: below 1 or above 1 with equal chance."""
    lo, hi = low_high
    if draw.happens(0.5) and lo < 1:
        return draw.uniform(lo, 1.0)
    return draw.uniform(max(lo, 1.0), hi)


def _intensity(image, cfg, draw, field_gen):
    """Per-sample intensity transforms on image (C, d, h, w), in the published order."""
    channels = image.shape[0]
    if draw.happens(cfg.p_noise):
        std = math.sqrt(draw.uniform(*cfg.noise_variance))
        image = image + std * torch.randn(image.shape, generator=field_gen, device=image.device)
    if draw.happens(cfg.p_blur):
        for c in range(channels):
            if draw.happens(cfg.p_blur_channel):
                image[c] = _gaussian_blur(image[c], draw.uniform(*cfg.blur_sigma), "reflect")
    if draw.happens(cfg.p_brightness_mult):
        factors = [draw.uniform(*cfg.brightness_mult_range) for _ in range(channels)]
        image = image * speed.to_device(factors, image.device, torch.float32).view(-1, 1, 1, 1)
    if draw.happens(cfg.p_brightness_add):
        shifts = [draw.normal(cfg.brightness_add_std) if draw.happens(cfg.p_brightness_add_channel)
                  else 0.0 for _ in range(channels)]
        image = image + speed.to_device(shifts, image.device, torch.float32).view(-1, 1, 1, 1)
    if draw.happens(cfg.p_contrast):
        for c in range(channels):
            image[c] = _contrast(image[c], _draw_ranged_factor(draw, cfg.contrast_range))
    if draw.happens(cfg.p_low_res):
        for c in range(channels):
            if draw.happens(cfg.p_low_res_channel):
                image[c] = _low_resolution(image[c], draw.uniform(*cfg.low_res_zoom))
    if draw.happens(cfg.p_gamma):
        for c in range(channels):
            image[c] = _gamma(image[c], _draw_ranged_factor(draw, cfg.gamma_range))
    return image


@torch.no_grad()
def augment_batch(image, regions, seed, config=AugmentConfig()):
    """Augment a batch on its device; deterministic given seed (and device).

    image (B, C, d, h, w) float; regions (B, R, d, h, w) {0, 1} (any dtype).
    Returns (image float32 (B, C, d, h, w), regions float32 {0, 1} (B, R, d, h, w)); the
    inputs are not modified. All-zero input channels stay exactly zero.
    """
    if image.ndim != 5 or regions.ndim != 5 or image.shape[0] != regions.shape[0] \
            or image.shape[2:] != regions.shape[2:]:
        raise ValueError(f"image (B, C, d, h, w) {tuple(image.shape)} and regions "
                         f"(B, R, d, h, w) {tuple(regions.shape)} do not match")
    image = image.to(torch.float32, copy=True)
    regions = regions.to(device=image.device, dtype=torch.float32, copy=True)
    draw = _Draw(seed)
    field_gen = torch.Generator(device=image.device).manual_seed(
        int(torch.randint(2 ** 62, (), generator=draw.gen)))
    present = image.flatten(2).ne(0).any(-1).to(torch.float32)[..., None, None, None]  # (B, C, 1, 1, 1)
    for b in range(image.shape[0]):
        warped = _spatial(image[b], regions[b], config, draw, field_gen)
        if warped is not None:
            image[b], regions[b] = warped
        image[b] = _intensity(image[b], config, draw, field_gen) * present[b]
        flips = [axis for axis in (1, 2, 3) if draw.happens(config.p_mirror_axis)]
        if flips:
            image[b], regions[b] = image[b].flip(flips), regions[b].flip(flips)
    return image, regions
