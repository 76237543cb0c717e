"""Pictures of segmentations: one PNG per case and a chart of an evaluation's Dice.

A case figure has one column per modality present (an axial slice through the tumour) and one
row per modality subset evaluated (its predicted regions drawn over every column; the panels of
the modalities the subset lacks dimmed), with the ground truth as the first row when the case
is labelled. Region colours are utils.overlay's (also the TensorBoard overlay of the teacher
election): WT green, TC yellow, ET red, half transparent.

matplotlib's object API with the Agg renderer (no pyplot, no display) works on headless
machines and in eval.py's writer threads; matplotlib is not thread-safe (its font cache is
shared), so figures are drawn one at a time.
"""
import threading

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from PIL import Image

from utils.io import atomic_path
from utils.modalities import MODALITIES, subset_name
from utils.overlay import REGION_COLOURS, shown_colours, tumour_slice, view
from utils.regions import labels_to_regions

DPI = 100
PANEL = 192  # px: a slice is enlarged by a whole factor to about this size (nearest neighbour)
GAP = 2  # px between panels
ROW_TITLES = 130  # px left of the panels, for the row titles
HEADER = 44  # px above the panels: the figure title, then the column titles
UNSEEN = 0.35  # brightness of a panel whose modality the row's prediction did not use
_DRAWING = threading.Lock()
# The voxel axes of BraTS's affine diag(-1, -1, 1): R->L, A->P, I->S (overlay.view's view).
BRATS_AXES = ("L", "P", "S")


def panel_scale(shape_hw):
    return max(1, round(PANEL / max(shape_hw)))


def case_layout(shape_hw, num_rows, num_columns):
    """-> (width, height, panel width, panel height) in pixels of a case figure."""
    scale = panel_scale(shape_hw)
    panel_w, panel_h = shape_hw[0] * scale, shape_hw[1] * scale  # panels show (H, W) transposed
    width = ROW_TITLES + num_columns * panel_w + (num_columns - 1) * GAP
    height = HEADER + num_rows * panel_h + (num_rows - 1) * GAP
    return width, height, panel_w, panel_h


def panel_box(shape_hw, row, column):
    """(top, left, bottom, right) pixel box of a panel in the written PNG: where case_figure
    pastes it and centres its titles, and where tests look for its colours."""
    _, _, panel_w, panel_h = case_layout(shape_hw, row + 1, column + 1)
    top = HEADER + row * (panel_h + GAP)
    left = ROW_TITLES + column * (panel_w + GAP)
    return top, left, top + panel_h, left + panel_w


def _panel(image, label, scale, brightness):
    """(H, W) slice + (H, W) label -> RGB (W*scale, H*scale, 3), as overlay.view shows it."""
    rgb = view(image, labels_to_regions(label), brightness)
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def _save(fig, path):
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def case_slices(case, subsets, labels):
    """What a case figure shows -> (title, images, columns, rows), case_figure's arguments.

    case: datasets.brats.Case with its normalised image; labels: one (D, H, W) label map per
    subset. The slice is the one with the most tumour in the ground truth, else in the last
    subset's prediction (the most modalities, in ALL_SUBSETS order).
    Every volume is first turned onto BraTS's voxel axes (`along_brats_axes`), so a case
    stored in another orientation is drawn the same way up; the title names the slice's index
    in the case's files.
    """
    turn = brats_turn(case.affine)
    along = lambda volume: along_brats_axes(volume, turn)
    truth = along(case.label) if case.label is not None else None
    labels = [along(label) for label in labels]
    d = tumour_slice(truth if truth is not None else labels[-1])
    columns = [MODALITIES[i] for i in case.available]
    rows = [("ground truth", truth[d], columns)] if truth is not None else []
    rows += [(subset_name(s), label[d], [MODALITIES[i] for i in s])
             for s, label in zip(subsets, labels)]
    axis, index = file_slice(d, case.image.shape[1:], turn)
    where = f"axial slice {index}" + ("" if axis == 2 else f" (the files' axis {'XYZ'[axis]})")
    return f"{case.name}, {where}", along(case.image)[list(case.available), d], columns, rows


def brats_turn(affine):
    """Per NIfTI axis of a grid with `affine`: (the BraTS axis it lies along, flip -1 or 1).
    An affine that gives an axis no direction (singular, which the checks of a case let pass
    when finite) leaves the volume as stored."""
    orientation = io_orientation(affine)
    if np.isnan(orientation).any():
        return np.array([[0, 1], [1, 1], [2, 1]])
    return ornt_transform(orientation, axcodes2ornt(BRATS_AXES))


def along_brats_axes(volume, turn):
    """A network-order volume (..., D, H, W) on a grid whose brats_turn is `turn` -> a view of
    the same voxels along BraTS's axes (BRATS_AXES), the ones overlay.view shows radiologically."""
    lead = volume.ndim - 3
    order = [0, 0, 0]
    for k, (to, flip) in enumerate(turn):  # NIfTI axis k is network axis (k + 1) % 3
        if flip < 0:
            volume = np.flip(volume, lead + (k + 1) % 3)
        order[(int(to) + 1) % 3] = lead + (k + 1) % 3
    return volume.transpose(*range(lead), *order)


def file_slice(d, shape_dhw, turn):
    """Axial slice d of along_brats_axes' volume -> (NIfTI axis, index) of it in the files."""
    axis = int(np.flatnonzero(turn[:, 0] == 2)[0])  # the files' axis along BraTS's z (S)
    size = shape_dhw[(axis + 1) % 3]
    return axis, (size - 1 - d if turn[axis, 1] < 0 else d)


def case_figure(path, title, images, columns, rows):
    """Write a case figure as PNG at `path`.

    images: (C, H, W) axial slices of the modalities named in `columns` (C names);
    rows: [(row title, (H, W) label slice with values 0/1/2/4, the columns it was predicted
    from)], drawn over every column, the others' panels dimmed.
    Returns the PNG's (width, height) in pixels.
    """
    images = np.asarray(images)
    shape_hw = images.shape[1:]
    scale = panel_scale(shape_hw)
    width, height, _, _ = case_layout(shape_hw, len(rows), len(columns))
    mosaic = np.full((height - HEADER, width - ROW_TITLES, 3), 255, dtype=np.uint8)
    for r, (_, label, seen) in enumerate(rows):
        for c, image in enumerate(images):
            top, left, bottom, right = panel_box(shape_hw, r, c)
            mosaic[top - HEADER:bottom - HEADER, left - ROW_TITLES:right - ROW_TITLES] = \
                _panel(image, label, scale, 1.0 if columns[c] in seen else UNSEEN)
    if any(set(columns) - set(seen) for _, _, seen in rows):
        title += "; dimmed: not an input of the row"
    with _DRAWING:
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
        canvas = FigureCanvasAgg(fig)
        fig.text(4 / width, 1 - 4 / height, title, ha="left", va="top", fontsize=9)
        # The legend sits left of the column titles, above the row titles: at the top right
        # it ran into the title of a narrow figure (one modality: predict.py --t2).
        for k, (region, colour) in enumerate(shown_colours().items()):
            fig.text((4 + 28 * k) / width, 1 - (HEADER - 4) / height, region, ha="left",
                     va="bottom", fontsize=9, fontweight="bold", color=colour / 255)
        for c, name in enumerate(columns):
            _, left, _, right = panel_box(shape_hw, 0, c)
            fig.text((left + right) / 2 / width, 1 - (HEADER - 4) / height, name,
                     ha="center", va="bottom", fontsize=9)
        for r, (row_title, _, _) in enumerate(rows):
            top, _, bottom, _ = panel_box(shape_hw, r, 0)
            fig.text(4 / width, 1 - (top + bottom) / 2 / height, row_title,
                     ha="left", va="center", fontsize=8)
        canvas.draw()
        picture = np.array(canvas.buffer_rgba())[..., :3]
    # The panels are pasted, not drawn: matplotlib would resample them (seconds per case).
    picture[HEADER:, ROW_TITLES:] = mosaic
    with atomic_path(path) as tmp:
        # Pillow comes with matplotlib; the fastest zlib level: the images are large, mostly flat
        Image.fromarray(picture).save(tmp, format="PNG", compress_level=1)
    return width, height


def dice_chart(path, table, title):
    """Write the summary table (eval.summary_table: one row per subset and a 'mean' row) as
    a bar chart: Dice (%) of ET, TC and WT per subset (with its number of cases when they
    differ), dashed lines at the mean row's."""
    rows, (mean,) = table[table["subset"] != "mean"], table[table["subset"] == "mean"].index
    regions = [column.split()[0] for column in table.columns if column.endswith(" Dice")]
    x = np.arange(len(rows))
    colours = {region: np.array(colour) / 255 for region, colour in REGION_COLOURS}
    bar = 0.8 / len(regions)
    with _DRAWING:
        fig = Figure(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.5), dpi=DPI)
        ax = fig.add_subplot()
        for k, region in enumerate(regions):
            dice = rows[f"{region} Dice"].to_numpy(dtype=float)
            ax.bar(x + (k - (len(regions) - 1) / 2) * bar, dice, bar, label=region, color=colours[region],
                   edgecolor="black", linewidth=0.3)
            ax.axhline(table.loc[mean, f"{region} Dice"], color=colours[region], linestyle="--",
                       linewidth=1)
        names = rows["subset"]
        if rows["cases"].nunique() > 1:  # --mode available: subsets of different sizes
            names = [f"{name} ({n})" for name, n in zip(names, rows["cases"])]
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("Dice (%)")
        ax.set_title(title, fontsize=10)
        # right of the axes: inside, it hid the top of bars near 100 (WT Dice above 90)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        fig.tight_layout()
        _save(fig, path)
