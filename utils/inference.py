"""Sliding-window inference over whole volumes: one implementation for validation and export.

The published protocol tiles the volume with the training patch, overlap 1/3, windows clamped
to the volume, and averages the overlapping predictions: the exported masks average the
windows' sigmoid probabilities, the teacher election their logits (AVERAGES). Options beyond
it follow nnU-Net: a Gaussian importance map (centre voxels count more than border voxels),
mirror test-time augmentation and mixed precision. Outputs and weights are accumulated in
float32 on the device, so a whole-volume prediction never leaves the GPU until the caller asks
for it.
"""
import itertools
import math

import numpy as np
import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The 8 combinations of flipping the three spatial axes of a (B, C, d, h, w) batch.
MIRROR_AXES = tuple(
    axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)
)
# What overlapping windows average: the published eval.py takes each window's sigmoid first,
# the published election the windows' logits. With 3 or more windows on a voxel the masks can
# differ: logits (10, -2, -2) give sigmoid(mean) 0.88, mean of the sigmoids 0.41.
AVERAGES = ("probabilities", "logits")
GAUSSIAN_FLOOR = 1e-6  # smallest weight, relative to the centre's 1: no voxel gets weight 0


def window_starts(size, window, step):
    """Start offsets of windows of `window` voxels every `step` along an axis of `size` voxels.

    The last window is clamped to end at the border (starts at size - window), as published,
    so every voxel is covered and no window leaves the volume. Requires size >= window.
    """
    last = size - window
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    return starts


def gaussian_map(window, device=None):
    """Importance map (d, h, w) float32: a Gaussian with sigma = window / 8 per axis, peak 1.

    Centred at (n - 1) / 2 so the map is symmetric under flips (mirror TTA stays unbiased);
    floored at GAUSSIAN_FLOOR so voxels only reached by window corners keep a weight > 0.
    """
    axes = []
    for n in window:
        x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n / 8)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (g / g.max()).clamp_min(GAUSSIAN_FLOOR).float()


def autocast(device, amp):
    """The autocast context of an --amp value ('off': a disabled one)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def sliding_window(predict, image, window, overlap=1 / 3, gaussian=False, batch_size=2,
                   mirror=False, device=None, amp="off"):
    """Average `predict` over overlapping windows covering `image`.

    predict: maps a float32 batch (B, C, d, h, w) to (B, K, d, h, w) (logits or probabilities).
    image: (C, D, H, W) tensor or array; moved to `device` (default: the image's device).
    window: (d, h, w), the training patch. overlap: fraction shared by neighbouring windows;
    step = ceil(window * (1 - overlap)) per axis. A volume smaller than the window along an
    axis is zero-padded (centred) to the window and the result cropped back.
    gaussian: weight each window by `gaussian_map` instead of uniformly.
    mirror: average over the 8 flips of the spatial axes (each output flipped back).
    amp: "off", "bf16" or "fp16" autocast for `predict`; accumulation is always float32.
    Returns float32 (K, D, H, W) on `device`.
    """
    image = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    device = torch.device(device) if device is not None else image.device
    if image.ndim != 4 or len(window) != 3:
        raise ValueError(f"expected image (C, D, H, W) and window (d, h, w), got "
                         f"{tuple(image.shape)} and {tuple(window)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = tuple(int(w) for w in window)
    image = image.to(device=device, dtype=torch.float32)
    size = tuple(image.shape[1:])

    # Pad small axes to the window; `crop` selects the original volume afterwards.
    pad_before = [max(w - s, 0) // 2 for s, w in zip(size, window)]
    pad_after = [max(w - s, 0) - b for s, w, b in zip(size, window, pad_before)]
    if any(pad_before) or any(pad_after):
        # F.pad lists the last axis first.
        pads = [p for b, a in zip(reversed(pad_before), reversed(pad_after)) for p in (b, a)]
        image = torch.nn.functional.pad(image, pads)
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, size))
    padded = tuple(image.shape[1:])

    steps = [max(1, math.ceil(w * (1 - overlap))) for w in window]
    corners = list(itertools.product(
        *(window_starts(s, w, st) for s, w, st in zip(padded, window, steps))))
    weight = (gaussian_map(window, device=device) if gaussian
              else torch.ones(window, device=device))

    out = None  # (K, D, H, W), allocated once K is known from the first batch
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    for i in range(0, len(corners), batch_size):
        batch_corners = corners[i:i + batch_size]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window))
                  for corner in batch_corners]
        x = torch.stack([image[(slice(None),) + sl] for sl in slices])
        pred = 0
        for axes in (MIRROR_AXES if mirror else ((),)):
            with autocast(device, amp):
                y = predict(x.flip(axes) if axes else x)
            y = y.float()
            pred = pred + (y.flip(axes) if axes else y)
        if mirror:
            pred = pred / len(MIRROR_AXES)
        if out is None:
            out = torch.zeros((pred.shape[1],) + padded, dtype=torch.float32, device=device)
        for p, sl in zip(pred, slices):
            out[(slice(None),) + sl] += p * weight
            norm[sl] += weight
    return out[(slice(None),) + crop] / norm[crop]


def predict_subsets(model, image, subsets, window, average, overlap=1 / 3, gaussian=False,
                    batch_size=2, mirror=False, device=None, amp="off"):
    """Region probabilities of `model` on one whole volume for several modality subsets.

    image: (4, D, H, W) normalised; subsets: sequence of sorted index tuples, e.g. [(0,), (0, 2)].
    Each window goes through `model.forward_subsets` once, so the shared encoder runs once per
    window for all subsets. average (AVERAGES): "probabilities" averages each window's sigmoid
    (the published export), "logits" the windows' logits, then takes the sigmoid (the published
    election).
    The model runs in eval mode and its train/eval mode is restored afterwards (training
    validation calls this mid-run). device: default the model's parameters' device.
    Returns float32 (S, 3, D, H, W) on `device`.
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    subsets = [tuple(s) for s in subsets]
    if device is None:
        device = next(model.parameters()).device

    def predict(x):  # (B, 4, d, h, w) -> (B, S*3, d, h, w)
        y = model.forward_subsets(x, subsets)
        y = y.reshape(y.shape[0], -1, *y.shape[3:])
        return torch.sigmoid(y.float()) if average == "probabilities" else y

    was_training = model.training
    model.eval()
    try:
        mean = sliding_window(predict, image, window, overlap=overlap, gaussian=gaussian,
                              batch_size=batch_size, mirror=mirror, device=device, amp=amp)
    finally:
        model.train(was_training)
    mean = mean.reshape(len(subsets), -1, *mean.shape[1:])
    return mean if average == "probabilities" else torch.sigmoid(mean)
