"""Region overlays on a slice: the case figures' panels (utils.figures) and the TensorBoard
image of the teacher election. numpy only, so that training does not import matplotlib."""
import numpy as np

from utils.modalities import SINGLE_SUBSETS
from utils.regions import REGIONS

# Overlay colours (RGB) in drawing order: later regions paint over earlier ones, like export.
REGION_COLOURS = (("WT", (0, 200, 0)), ("TC", (255, 220, 0)), ("ET", (255, 0, 0)))
OVERLAY_ALPHA = 0.5


def tumour_slice(label):
    """Label map (D, H, W) -> index along D of the axial slice with the most tumour voxels
    (the middle slice when there is none)."""
    area = np.count_nonzero(np.asarray(label).reshape(len(label), -1), axis=1)
    return int(area.argmax()) if area.any() else len(label) // 2


def overlay(image, regions, brightness=1.0):
    """Normalised slice (H, W) + region masks (3, H, W) in ET, WT, TC order -> RGB uint8
    (H, W, 3): the background (exactly 0) black, the brain grey from 5 % to white between its
    0.5 and 99.5 percentiles (z-scores would put the background mid-grey), times `brightness`,
    the regions blended over it."""
    image = np.asarray(image, dtype=np.float32)
    brain = image != 0
    grey = np.zeros(image.shape, np.float32)
    if brain.any():
        lo, hi = np.percentile(image[brain], (0.5, 99.5))
        grey[brain] = (np.clip((image[brain] - lo) / max(hi - lo, 1e-6), 0, 1) * 0.95 + 0.05) * 255
        grey *= brightness
    return _blend(np.repeat(grey[..., None], 3, axis=-1), regions).astype(np.uint8)


def view(image, regions, brightness=1.0):
    """overlay() of an (H, W) slice, transposed -> RGB (W, H, 3): rows follow the second NIfTI
    axis, so that for BraTS's affine diag(-1, -1, 1) a slice is seen in the radiological view
    (anterior up, the patient's left on the right). The case figures first turn every case onto
    those axes (figures.along_brats_axes); the TensorBoard overlay shows the training cache's
    slices as stored."""
    return overlay(image, regions, brightness).transpose(1, 0, 2)


def _blend(rgb, regions):
    """Paint region masks (3, ...) in ET, WT, TC order over float RGB (..., 3), in place."""
    for region, colour in REGION_COLOURS:
        mask = np.asarray(regions[REGIONS.index(region)], dtype=bool)
        rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.array(colour)
    return rgb


def shown_colours(grey=128):
    """{region: RGB uint8} as a panel shows the inner part of each region: blended over the
    regions it lies in (ET over TC over WT: orange, not the red painted), on mid-grey. For
    legends, whose pure colours match none of the pixels drawn."""
    depth = np.arange(len(REGION_COLOURS))  # pixel k lies in the first k + 1 REGION_COLOURS
    inside = {region: depth >= k for k, (region, _) in enumerate(REGION_COLOURS)}
    rgb = _blend(np.full((len(depth), 3), float(grey)), [inside[region] for region in REGIONS])
    return {region: rgb[k].astype(np.uint8) for k, (region, _) in enumerate(REGION_COLOURS)}


def overlay_panel(sample):
    """One row: ground truth on FLAIR, then each modality's prediction on that modality
    (FLAIR, T1, T1ce, T2), each slice as `view` shows it."""
    panels = [view(sample["image"][0], sample["truth"])]
    for i, subset in enumerate(SINGLE_SUBSETS):
        panels.append(view(sample["image"][subset[0]], sample["pred"][i]))
    return np.concatenate(panels, axis=1)
