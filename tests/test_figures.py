"""utils/figures.py: case figures checked pixel by pixel, the Dice chart, the slice choice."""
import numpy as np
import pandas as pd
from matplotlib.image import imread

from datasets.brats import Case

from utils import figures
from utils.overlay import overlay, overlay_panel, shown_colours, tumour_slice

# (R - B, G - B) of a panel pixel for each label, from utils.overlay.overlay's blending with
# alpha 0.5 in the order WT green (0, 200, 0), TC yellow (255, 220, 0), ET red (255, 0, 0)
# over a grey pixel: background stays grey (0, 0); edema (WT) (0, 100); necrosis (WT, TC)
# (127.5, 160); enhancing tumour (WT, TC, ET) (191.25, 80).
SIGNATURES = {0: (0, 0), 2: (0, 100), 1: (127.5, 160), 4: (191.25, 80)}


def read_png(path, size):
    """A PNG of `size` (width, height) -> RGB int array (height, width, 3)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgba = imread(path)
    assert (rgba.shape[1], rgba.shape[0]) == tuple(size)
    return np.round(rgba[..., :3] * 255).astype(int)


def assert_regions_drawn(rgb, box, label):
    """Every pixel of the panel at `box` has the colour of its voxel's label.

    label: the slice (H, W) as stored, e.g. a NIfTI mask's [:, :, z]; the panel shows it
    transposed and enlarged by a whole factor.
    """
    top, left, bottom, right = box
    panel = rgb[top:bottom, left:right]
    scale = panel.shape[1] // label.shape[0]
    assert panel.shape[:2] == (label.shape[1] * scale, label.shape[0] * scale)
    expected = label.T.repeat(scale, 0).repeat(scale, 1)
    signature = np.stack([panel[..., 0] - panel[..., 2], panel[..., 1] - panel[..., 2]], -1)
    for value, (red, green) in SIGNATURES.items():
        where = expected == value
        assert np.abs(signature[where] - (red, green)).max(initial=0) <= 2, value
    assert len(np.unique(expected)) > 1  # something was drawn


def test_case_figure_draws_each_row_over_each_column(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 24, 40)).astype(np.float32)  # (C, H, W)
    images[:, :3] = 0  # background
    truth = np.zeros((24, 40), np.uint8)
    truth[5:15, 10:30] = 2
    truth[8:12, 15:25] = 1
    truth[9:11, 18:20] = 4
    prediction = np.zeros_like(truth)
    prediction[2:6, 30:38] = 4
    prediction[10:20, 5:12] = 2
    columns = ["flair", "t1ce", "t2"]
    size = figures.case_figure(tmp_path / "case.png", "case X, axial slice 7", images, columns,
                               [("ground truth", truth, columns), ("t1ce", prediction, ["t1ce"])])
    assert size == figures.case_layout((24, 40), 2, 3)[:2]
    rgb = read_png(tmp_path / "case.png", size)
    for row, label in enumerate((truth, prediction)):
        for column in range(3):
            assert_regions_drawn(rgb, figures.panel_box((24, 40), row, column), label)
    assert (rgb[:figures.HEADER, :] < 128).any()  # the titles are written

    # The t1ce row's FLAIR and T2 panels, which it did not see, are dimmed; its T1ce is not:
    # where neither row draws a region, a pixel is the ground truth row's grey times UNSEEN.
    scale = figures.panel_scale((24, 40))
    clear = ((truth == 0) & (prediction == 0)).T.repeat(scale, 0).repeat(scale, 1)
    for column, brightness in enumerate((figures.UNSEEN, 1.0, figures.UNSEEN)):
        (t0, l0, b0, r0), (t1, l1, b1, r1) = (figures.panel_box((24, 40), row, column)
                                              for row in (0, 1))
        full, shown = rgb[t0:b0, l0:r0, 0][clear], rgb[t1:b1, l1:r1, 0][clear]
        assert full.max() > 200
        np.testing.assert_allclose(shown, full * brightness, atol=1.5)


def test_overlay_grey_levels_background_black_brain_stretched_once():
    image = np.zeros((20, 20), np.float32)
    image[:, 10:] = np.linspace(-1.0, 3.0, 200).reshape(20, 10)  # the brain: z-scores
    rgb = overlay(image, np.zeros((3, 20, 20), bool)).astype(int)
    assert (rgb[..., 0] == rgb[..., 2]).all() and (rgb[:, :10] == 0).all()
    lo, hi = np.percentile(image[:, 10:], (0.5, 99.5))
    expected = np.floor((np.clip((image[:, 10:] - lo) / (hi - lo), 0, 1) * 0.95 + 0.05) * 255)
    np.testing.assert_allclose(rgb[:, 10:, 0], expected, atol=1)
    assert (rgb[:, 10:, 0] == 255).mean() <= 0.01  # the top 0.5 % (and rounding) only


def test_tumour_slice():
    label = np.zeros((6, 4, 4), np.uint8)
    assert tumour_slice(label) == 3  # no tumour: the middle slice
    label[1, :2, :2] = 2
    label[4, :3, :3] = 1
    assert tumour_slice(label) == 4


def test_dice_chart(tmp_path):
    table = pd.DataFrame({"subset": ["flair", "t1ce", "mean"], "cases": [1, 2, 3],
                          "ET Dice": [10.0, 80.0, 45.0],
                          "TC Dice": [20.0, 70.0, 45.0], "WT Dice": [90.0, 50.0, 70.0]})
    figures.dice_chart(tmp_path / "dice.png", table, "test")
    rgb = read_png(tmp_path / "dice.png", (600, 450))
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert {(255, 0, 0), (255, 220, 0), (0, 200, 0)} <= colours  # one bar colour per region


def test_the_dice_chart_legend_hides_no_bar(tmp_path, monkeypatch):
    # Dice near 100, as WT's: a legend inside the axes covered the tops of the first bars.
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    table = pd.DataFrame({"subset": ["flair", "t1ce", "mean"], "cases": [1, 1, 2],
                          "ET Dice": [99.0] * 3, "TC Dice": [99.0] * 3, "WT Dice": [99.0] * 3})
    figures.dice_chart(tmp_path / "dice.png", table, "test")
    (fig,) = drawn
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [bar.get_window_extent() for bar in ax.patches]
    assert len(bars) == 6 and not any(legend.overlaps(bar) for bar in bars)
    assert legend.x1 <= fig.bbox.x1 and legend.y1 <= fig.bbox.y1  # and not cut off


def test_tensorboard_overlay_has_the_case_figures_orientation():
    """The election's TensorBoard overlay shows each (H, W) slice as the case figures do,
    transposed (rows: the second NIfTI axis), not lying on its side."""
    h, w = 6, 10  # a slice wider along H than along W
    image = np.ones((4, h, w), np.float32)
    truth = np.zeros((3, h, w), bool)
    truth[1, 0, w - 1] = True  # WT at the first H row, last W column
    sample = {"image": image, "truth": truth, "pred": np.zeros((4, 3, h, w), bool)}
    picture = overlay_panel(sample)
    assert picture.shape == (w, 5 * h, 3)  # five panels side by side, each (W, H)
    green = picture[..., 1] > picture[..., 0]
    assert np.argwhere(green).tolist() == [[w - 1, 0]]  # the voxel (0, w-1), transposed


def test_case_figure_title_never_covers_the_legend(tmp_path):
    """One column (predict.py with one modality) and a long case name (-o
    Brats18_..._mask.nii.gz): the title's pixels and the legend's stay apart."""
    image = np.ones((1, 96, 96), np.float32)
    label = np.zeros((96, 96), np.uint8)
    drawn = {}
    for key, title in (("bare", ""), ("titled", "Brats18_TCIA08_242_1_mask, axial slice 21")):
        figures.case_figure(tmp_path / f"{key}.png", title, image, ["t2"], [("t2", label, ["t2"])])
        drawn[key] = read_png(tmp_path / f"{key}.png",
                              figures.case_layout((96, 96), 1, 1)[:2])[:figures.HEADER]
    bare = drawn["bare"]
    legend = bare.max(-1) - bare.min(-1) > 60  # the coloured region names
    title = (drawn["titled"] != bare).any(-1)
    assert legend.any() and title.any()
    assert not (legend & title).any()


def test_the_case_figure_legend_has_the_colours_the_panels_show(tmp_path):
    # Blended as drawn (alpha 0.5, WT then TC then ET) over mid-grey 128: WT 128/2 + (0, 200,
    # 0)/2; TC that over WT, then (255, 220, 0)/2; ET that, then (255, 0, 0)/2: orange, not red.
    expected = {"WT": (64, 164, 64), "TC": (159, 192, 32), "ET": (207, 96, 16)}
    assert {region: tuple(colour) for region, colour in shown_colours().items()} == expected
    image, label = np.ones((1, 96, 96), np.float32), np.zeros((96, 96), np.uint8)
    figures.case_figure(tmp_path / "case.png", "", image, ["t2"], [("t2", label, ["t2"])])
    header = read_png(tmp_path / "case.png", figures.case_layout((96, 96), 1, 1)[:2])[
        :figures.HEADER, :figures.ROW_TITLES]
    for colour in expected.values():  # the core pixels of each name's letters
        assert (header == colour).all(-1).sum() >= 10, colour


def test_case_figures_show_a_case_stored_in_another_orientation_the_same_way_up():
    """The same head stored along other voxel axes (flipped, z pointing down, x and y swapped)
    gives the same figure: the volumes are turned onto BraTS's axes by their affine; the title
    names the slice's index in the files."""
    rng = np.random.default_rng(0)
    d, h, w = 12, 9, 7  # network order (Z, X, Y)
    image = rng.normal(size=(4, d, h, w)).astype(np.float32)
    label = np.zeros((d, h, w), np.uint8)
    label[8, 1:3, 5] = 4  # the most tumour at z = 8, towards one corner
    label[3, 4, 4] = 2
    prediction = np.roll(label, 1, axis=2)

    def case(turn, affine):
        return Case("P", {}, turn(image), turn(label), affine, None, None, (1.0, 1.0, 1.0),
                    available=(0, 2))

    def nifti_affine(columns):
        affine = np.eye(4)
        affine[:3, :3] = np.array(columns, float).T  # column k: the world direction of axis k
        return affine

    brats = case(lambda v: v, nifti_affine([(-1, 0, 0), (0, -1, 0), (0, 0, 1)]))
    stored = {  # the voxels as another file stores them, its affine, the title expected
        "x and y flipped (RAS)": (lambda v: v[..., ::-1, ::-1],
                                  nifti_affine([(1, 0, 0), (0, 1, 0), (0, 0, 1)]), "axial slice 8"),
        "z down": (lambda v: v[..., ::-1, :, :],
                   nifti_affine([(-1, 0, 0), (0, -1, 0), (0, 0, -1)]), "axial slice 3"),
        "x and y swapped": (lambda v: np.swapaxes(v, -1, -2),
                            nifti_affine([(0, -1, 0), (-1, 0, 0), (0, 0, 1)]), "axial slice 8"),
        "z first": (lambda v: np.moveaxis(v, -1, -3),  # files' axes: S, then L, then P
                    nifti_affine([(0, 0, 1), (-1, 0, 0), (0, -1, 0)]),
                    "axial slice 8 (the files' axis X)"),
        "singular (drawn as stored)": (lambda v: v, nifti_affine([(-1, 0, 0), (0, -1, 0), (0, 0, 0)]),
                                       "axial slice 8"),
    }
    title, images, columns, rows = figures.case_slices(brats, [(0, 2)], [prediction])
    assert title == "P, axial slice 8" and columns == ["flair", "t1ce"]
    np.testing.assert_array_equal(images, image[[0, 2], 8])
    np.testing.assert_array_equal(rows[0][1], label[8])
    for name, (turn, affine, expected) in stored.items():
        other = figures.case_slices(case(turn, affine), [(0, 2)], [turn(prediction)])
        assert other[0] == f"P, {expected}", name
        np.testing.assert_array_equal(other[1], images, err_msg=name)
        for (_, drawn, _), (_, reference, _) in zip(other[3], rows):
            np.testing.assert_array_equal(drawn, reference, err_msg=name)
