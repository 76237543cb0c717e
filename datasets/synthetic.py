"""A BraTS-like synthetic dataset, generated on demand, in the BraTS 2018 layout.

    python -m datasets.synthetic --out_dir data/synthetic --num_cases 20 [--shape 240,240,155]
                                 [--seed 0] [--format nii|nii.gz] [--reuse] [--layout flat|brats18]

writes DIR/Synth_0000/Synth_0000_{flair,t1,t1ce,t2,seg}.<fmt> ... and the split lists
DIR/{train,val,test}.csv (one case folder name per line, relative to DIR, no header): in case
order, the last 20 % (rounded, at least 1 from 3 cases on) are test, the 20 % before them val,
the rest train.
DIR/synthetic.json, written last, records the settings: with --reuse (run.sh demo) a folder
that holds the dataset of the same settings is kept as it is, one of other settings refused.

Each case: a brain (ellipsoid with a smoothly deformed surface) of white matter, grey matter
(outer ribbon), CSF (lateral ventricles and a thin outer shell) and one tumour: edema (label 2)
around a tumour core made of an enhancing rim (label 4) and, in most cases, a necrotic centre
(label 1); every structure is a randomly rotated, stretched and deformed blob. Each modality
shows each tissue the way real MRI does (table `_CONTRAST`), then a per-case intensity scale
(smaller for small brains, see `_BRAIN_VOXELS_PER_SCALE`), a smooth multiplicative bias field
per modality and Rician noise are applied. The contrasts are designed so that the most
informative single modality is T1ce for ET and TC (bright rim, dark necrosis) and FLAIR, then
T2, for WT (edema brightest on FLAIR; on T2, CSF is as bright as the tumour), while edema looks
like normal tissue on T1ce and T1 shows the tumour only weakly.

Images are int16 (non-negative, background exactly 0, brain voxels >= 1), labels uint8 in
{0, 1, 2, 4}, 1 mm isotropic, affine diag(-1, -1, 1) with origin (0, Y-1, 0) like BraTS.
Case k depends only on (seed, k), never on the number of cases, and the same seed gives the
same bytes (gzip is written with mtime 0 and no file name in its header).
"""
import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.brats import datalist_entries
from utils.cli import ArgumentParser, UsageError, int_at_least, path_given, run_cli
from utils.io import atomic_path, check_writable, write_text
from utils.modalities import MODALITIES

CASE_PREFIX = "Synth_"
RECORD = "synthetic.json"  # the settings of the dataset in the folder
BRATS18_LISTS = Path(__file__).resolve().parents[1] / "datalist" / "BraTS18"
LAYOUTS = ("flat", "brats18")
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}  # the rest is train

# Mean intensity of each tissue per modality, relative to white matter on T1 (before the
# per-case scale). Rows in MODALITIES order: flair, t1, t1ce, t2.
_TISSUES = ("WM", "GM", "CSF", "ED", "ET", "NCR")
_CONTRAST = np.array([
    #  WM    GM    CSF   ED    ET    NCR
    [0.72, 0.88, 0.20, 1.35, 1.15, 0.95],  # FLAIR: CSF suppressed, edema brightest, ET ~ edema/core
    [1.00, 0.78, 0.30, 0.82, 0.86, 0.66],  # T1: tumour slightly hypointense, low contrast
    [1.00, 0.78, 0.30, 0.88, 1.90, 0.45],  # T1ce: ET bright, necrosis dark, edema ~ normal
    [0.55, 0.80, 1.80, 1.40, 1.25, 1.55],  # T2: fluid (CSF, necrosis) brightest, edema bright
], dtype=np.float32)
# Relative amplitude of the smooth texture inside each tumour region (necrosis is the most
# heterogeneous).
_TUMOUR_TEXTURE = {"ED": 0.1, "ET": 0.1, "NCR": 0.12}
_P_NO_NECROSIS = 0.25
_SOFT_EDGE = 0.5  # voxels: width of the partial-volume transition at structure borders
# The intensity scale is at most (brain voxels) / this: a small brain spread over ~1 000
# intensity levels leaves no level with the 50 voxels the published normalisation needs to
# clip at. 64 keeps the commonest level above ~65 voxels down to 16^3 volumes, and leaves the
# demo's 96 x 96 x 64 cases (brains of over 76 800 voxels) and larger ones as they were.
_BRAIN_VOXELS_PER_SCALE = 64


def affine_for(shape_xyz):
    """BraTS-like 1 mm affine: x and y flipped (LPS-ish), origin at (0, Y-1, 0)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape_xyz[1] - 1
    return affine


def case_name(index):
    return f"{CASE_PREFIX}{index:04d}"


def split_counts(num_cases):
    """(train, val, test) sizes: 20 % val and 20 % test (rounded), at least one each when
    num_cases >= 3; with fewer cases, train first, then val, test gets none."""
    if num_cases >= 3:
        n_val = max(1, round(num_cases * SPLIT_FRACTIONS["val"]))
        n_test = max(1, round(num_cases * SPLIT_FRACTIONS["test"]))
        return num_cases - n_val - n_test, n_val, n_test
    return 1, num_cases - 1, 0


# ----------------------------------------------------------------------------- random fields

def _basis(n, knots):
    """(n, knots) Gaussian bumps at `knots` evenly spaced centres covering [0, n) with a margin;
    rows have unit L2 norm so that a field with N(0, 1) coefficients has unit variance."""
    spacing = n / max(knots - 1, 1)
    centres = np.linspace(-0.5 * spacing, n - 1 + 0.5 * spacing, knots)
    x = np.arange(n, dtype=np.float64)[:, None]
    b = np.exp(-0.5 * ((x - centres[None, :]) / spacing) ** 2)
    return (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng, shape, knots):
    """Smooth random field (shape) of unit variance whose features are about shape / knots wide.

    A tensor product of per-axis Gaussian bumps with random coefficients: three small
    matrix products instead of interpolating a noise grid (faster and smoother than zoom).
    """
    knots = np.broadcast_to(knots, 3)
    coef = rng.standard_normal(tuple(knots), dtype=np.float32)
    b0, b1, b2 = (_basis(n, k) for n, k in zip(shape, knots))
    f = np.tensordot(b0, coef, axes=(1, 0))   # (X, k1, k2)
    f = np.tensordot(f, b1, axes=(1, 1))      # (X, k2, Y)
    f = np.tensordot(f, b2, axes=(1, 1))      # (X, Y, Z)
    return np.ascontiguousarray(f, dtype=np.float32)


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix


# ------------------------------------------------------------------------------- anatomy

class _Blob:
    """A deformed ellipsoid: d(x) = |diag(1/scales) R (x - c)| / radius + amp * F(x); blob = d < 1.

    `d` is evaluated on a box of the grid around the centre (`self.box`, slices), so the cost
    is that of the blob, not of the volume.
    """

    def __init__(self, centre, radius, scales, rotation, amp, knots, grid_shape):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.radius = float(radius)
        self.scales = np.asarray(scales, dtype=np.float64)
        self.rotation = rotation
        self.amp, self.knots = amp, knots
        # |diag(1/s) R (x-c)| > radius (1 + 3 amp) lies outside the blob unless F < -3.
        half = self.radius * self.scales.max() * (1 + 3 * amp) + 2
        lo = np.clip(np.floor(self.centre - half), 0, grid_shape).astype(int)
        hi = np.clip(np.ceil(self.centre + half) + 1, 0, grid_shape).astype(int)
        self.box = tuple(slice(a, b) for a, b in zip(lo, hi))

    def distance(self, rng, box):
        """d on the grid slices `box` (float32 array of the box's shape)."""
        axes = [np.arange(s.start, s.stop, dtype=np.float32) - c for s, c in zip(box, self.centre)]
        m = (self.rotation / self.scales[:, None]).astype(np.float32)
        q2 = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
        for row in m:  # |M (x - c)|^2, one rotated coordinate at a time, by broadcasting
            qi = (row[0] * axes[0][:, None, None] + row[1] * axes[1][None, :, None]
                  + row[2] * axes[2][None, None, :])
            q2 += qi * qi
        d = np.sqrt(q2) / self.radius
        d += self.amp * _smooth_field(rng, d.shape, self.knots)
        return d


def _random_blob(rng, centre, radius, stretch, amp, knots, grid_shape, rotation=None):
    """A blob with random orientation (unless given) and axis stretches exp(U(-s, s))."""
    rotation = _rotation(rng) if rotation is None else rotation
    scales = np.exp(rng.uniform(-stretch, stretch, 3))
    return _Blob(centre, radius, scales, rotation, amp, knots, grid_shape)


def _union(*boxes):
    return tuple(slice(min(s.start for s in ss), max(s.stop for s in ss)) for ss in zip(*boxes))


def _soft(d, radius):
    """Partial-volume membership of d < 1, with an edge about _SOFT_EDGE voxels wide."""
    return _sigmoid((1.0 - d) * radius / _SOFT_EDGE)


def _synth_case(rng, shape_xyz):
    """One case: dict modality -> int16 (X, Y, Z) and the uint8 label map (X, Y, Z)."""
    shape = np.asarray(shape_xyz)
    # Brain: semi-axes like a 140 x 170 x 130 mm brain in a 240 x 240 x 155 volume.
    semi = np.array([0.29, 0.355, 0.41]) * shape * rng.uniform(0.92, 1.04, 3)
    centre = shape / 2 + rng.uniform(-0.02, 0.02, 3) * shape
    half = semi * 1.12  # the surface deformation below stays within 12 %
    lo = np.clip(np.floor(centre - half), 0, shape).astype(int)
    hi = np.clip(np.ceil(centre + half) + 1, 0, shape).astype(int)
    brain_box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(hi - lo)
    c = centre - lo  # brain centre in box coordinates

    u = [(np.arange(n, dtype=np.float32) - ci) / si for n, ci, si in zip(bshape, c, semi)]
    r = np.sqrt(u[0][:, None, None] ** 2 + u[1][None, :, None] ** 2 + u[2][None, None, :] ** 2)
    r *= 1 + 0.04 * _smooth_field(rng, bshape, 6)  # bumpy surface
    brain = r < 1
    mean_semi = float(semi.mean())
    voxel_r = 1.0 / mean_semi  # one voxel in units of r

    # Everything below works on the brain's voxels only, as a (tissues, n) matrix of partial-
    # volume weights W (modality-independent): a modality's image is then contrast @ W.
    pos = np.full(bshape, -1, dtype=np.int64)
    pos[brain] = np.arange(int(brain.sum()))
    r_b = r[brain]

    # Normal tissue: WM inside, a GM ribbon of wavy depth, CSF as a thin outer shell.
    wm = _sigmoid((0.80 + 0.06 * _smooth_field(rng, bshape, 8)[brain] - r_b) / (2 * voxel_r))
    csf = 0.8 * _sigmoid((r_b - 0.96) / (0.6 * voxel_r))
    # Lateral ventricles: two elongated blobs either side of the midline, above the centre.
    for side in (-1, 1):
        vc = c + np.array([side * 0.13, rng.uniform(-0.05, 0.05), 0.12]) * semi
        scales = np.array([0.7, 2.2, 1.2]) * rng.uniform(0.8, 1.2, 3)
        v = _Blob(vc, 0.15 * mean_semi, scales, np.eye(3), 0.15, 4, bshape)
        inside = brain[v.box]
        p = pos[v.box][inside]
        csf[p] = np.maximum(csf[p], _soft(v.distance(rng, v.box)[inside], v.radius))
    texture = 1 + 0.06 * _smooth_field(rng, bshape, 12)[brain]
    weights = np.empty((len(_TISSUES), len(r_b)), dtype=np.float32)
    weights[0] = (1 - csf) * wm * texture
    weights[1] = (1 - csf) * (1 - wm) * texture
    weights[2] = csf
    weights[3:] = 0

    # Tumour: edema around a core (enhancing rim + optional necrosis), all inside the brain.
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    t_centre = c + direction * rng.uniform(0.0, 0.5) ** (1 / 3) * 0.55 * semi
    r_ed = max(rng.uniform(0.35, 0.6) * mean_semi, 4.0)
    necrotic = rng.random() >= _P_NO_NECROSIS
    # Solid (non-necrotic) cores are smaller, like lower-grade tumours.
    r_tc = max((rng.uniform(0.45, 0.7) if necrotic else rng.uniform(0.3, 0.5)) * r_ed, 2.0)
    tc_centre = t_centre + rng.uniform(-0.2, 0.2, 3) * r_ed
    edema = _random_blob(rng, t_centre, r_ed, 0.25, 0.3, 7, bshape)
    core_rot = _rotation(rng)
    core = _random_blob(rng, tc_centre, r_tc, 0.2, 0.15, 5, bshape, rotation=core_rot)
    blobs = {"ED": edema, "ET": core}
    # Keep an enhancing rim of at least 2 voxels around the necrosis.
    r_ncr = min(rng.uniform(0.5, 0.8) * r_tc, r_tc - 2.0)
    if necrotic and r_ncr >= 1.5:
        ncr_centre = tc_centre + rng.uniform(-0.1, 0.1, 3) * r_tc
        blobs["NCR"] = _random_blob(rng, ncr_centre, r_ncr, 0.1, 0.12, 4, bshape,
                                    rotation=core_rot)
    # Edema also wraps the core in a shell at least `margin` voxels thick.
    margin = rng.uniform(0.1, 0.3) * r_ed + 1.0
    tbox = tuple(slice(max(s.start - int(margin) - 1, 0), min(s.stop + int(margin) + 1, n))
                 for s, n in zip(_union(*(b.box for b in blobs.values())), bshape))
    inside = brain[tbox]
    p = pos[tbox][inside]
    dist = {k: b.distance(rng, tbox)[inside] for k, b in blobs.items()}
    dist["ED"] = np.minimum(dist["ED"], dist["ET"] * (r_tc / (r_tc + margin)))
    label_t = np.zeros(len(p), dtype=np.uint8)
    for region, value in (("ED", 2), ("ET", 4), ("NCR", 1)):  # inner regions paint last
        if region in blobs:
            member = _soft(dist[region], blobs[region].radius)
            texture = 1 + _TUMOUR_TEXTURE[region] * _smooth_field(rng, inside.shape, 8)[inside]
            weights[:, p] *= 1 - member
            weights[_TISSUES.index(region), p] += member * texture
            label_t[member > 0.5] = value

    label = np.zeros(tuple(shape), dtype=np.uint8)
    label_brain = np.zeros(len(r_b), dtype=np.uint8)
    label_brain[p] = label_t
    label[brain_box][brain] = label_brain

    contrast = _CONTRAST * rng.uniform(0.95, 1.05, _CONTRAST.shape).astype(np.float32)
    clean = contrast @ weights  # (4, n)
    images = {}
    max_scale = len(r_b) / _BRAIN_VOXELS_PER_SCALE
    for m, name in enumerate(MODALITIES):
        bias = np.exp(0.15 * _smooth_field(rng, bshape, 3)[brain])
        scale = np.float32(min(rng.uniform(300, 1200), max_scale))
        sigma = np.float32(rng.uniform(0.04, 0.08) * contrast[m, 0])
        # Rician noise: magnitude of a complex signal with Gaussian noise on both channels.
        re = clean[m] * bias + sigma * rng.standard_normal(len(r_b), dtype=np.float32)
        im = sigma * rng.standard_normal(len(r_b), dtype=np.float32)
        v = np.rint(np.sqrt(re * re + im * im) * scale)
        vol = np.zeros(tuple(shape), dtype=np.int16)
        vol[brain_box][brain] = np.clip(v, 1, np.iinfo(np.int16).max)  # brain voxels stay > 0
        images[name] = vol
    return images, label


# -------------------------------------------------------------------------------- writing

def _write_nifti(array, affine, path):
    """Write `array` as NIfTI at `path` (.nii or .nii.gz), atomically and byte-reproducibly."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if str(path).endswith(".gz"):
                # nibabel would store the time and the temporary name in the gzip header.
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                   compresslevel=1) as gz:
                    gz.write(data)
            else:
                f.write(data)


def _volume_shape(sizes):
    """Three sizes (ints or their strings) -> tuple of ints; ValueError unless all are >= 16
    (generate's check, and main's for --shape)."""
    shape = tuple(int(n) for n in sizes)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape_xyz must be three sizes >= 16, got {shape}")
    return shape


def volume_shape(text):
    """An argparse type: 'X,Y,Z' -> (X, Y, Z), three sizes >= 16 in decimal digits (run.sh demo
    reads DEMO_SHAPE in bash too, where '+96', '6_4' and other digits than 0-9, all ints to
    Python, are errors)."""
    sizes = str(text).split(",")
    try:
        if not all(re.fullmatch(r" *[0-9]+ *", size) for size in sizes):
            raise ValueError(text)
        return _volume_shape(sizes)
    except ValueError:  # a size that is not an integer, or the check's own refusal
        raise argparse.ArgumentTypeError(f"must be three comma-separated sizes >= 16, got "
                                         f"{text!r}") from None


def _check_format(fmt):
    if fmt not in ("nii", "nii.gz"):
        raise ValueError(f"fmt must be 'nii' or 'nii.gz', got {fmt!r}")


def _write_case(case_dir, rng, shape_xyz, fmt, labelled=True):
    """Draw one case from `rng` and write it into case_dir as <folder name>_<part>.<fmt>."""
    name = case_dir.name
    images, label = _synth_case(rng, shape_xyz)
    affine = affine_for(shape_xyz)
    # A case written before in the other format, or with its label, would leave stray files.
    other = "nii" if fmt == "nii.gz" else "nii.gz"
    for part in (*images, "seg"):
        (case_dir / f"{name}_{part}.{other}").unlink(missing_ok=True)
    (case_dir / f"{name}_seg.{fmt}").unlink(missing_ok=True)
    for modality, vol in images.items():
        _write_nifti(vol, affine, case_dir / f"{name}_{modality}.{fmt}")
    if labelled:
        _write_nifti(label, affine, case_dir / f"{name}_seg.{fmt}")


def generate(out_dir, num_cases, shape_xyz=(240, 240, 155), seed=0, fmt="nii.gz"):
    """Write `num_cases` synthetic cases and the split lists into `out_dir`; return the case
    folders (Paths, in index order). Case k is drawn from np.random.default_rng([seed, k])."""
    _check_format(fmt)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    shape_xyz = _volume_shape(shape_xyz)
    out_dir = Path(out_dir)
    case_dirs = []
    for k in range(num_cases):
        case_dir = out_dir / case_name(k)
        _write_case(case_dir, np.random.default_rng([seed, k]), shape_xyz, fmt)
        case_dirs.append(case_dir)
    n_train, n_val, _ = split_counts(num_cases)
    names = [d.name for d in case_dirs]
    splits = {"train": names[:n_train], "val": names[n_train:n_train + n_val],
              "test": names[n_train + n_val:]}
    for split, entries in splits.items():
        write_text(out_dir / f"{split}.csv", "".join(f"{e}\n" for e in entries))
    return case_dirs


def reused(out_dir, settings):
    """--reuse: whether out_dir holds the dataset of `settings` (its RECORD says so), which is
    then kept; UsageError when it holds one of other settings. A folder without a record
    (none, or an older version's dataset) is generated (the same settings give the same bytes)."""
    try:
        found = json.loads((out_dir / RECORD).read_text())
        if not isinstance(found, dict) or not isinstance(found.get("shape"), list):
            raise ValueError("not a record of settings")  # edited: no traceback below
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as err:
        raise UsageError(f"{out_dir / RECORD}: unreadable ({err}); delete it to generate the "
                         "dataset again") from None
    if found != settings:
        def describe(s):
            cases = ("the BraTS 2018 layout" if s.get("layout") == "brats18"
                     else f"{s.get('num_cases')} cases")
            return (f"{cases} of {'x'.join(map(str, s.get('shape') or ()))}, seed {s.get('seed')}, "
                    f"{s.get('format')}")
        raise UsageError(f"{out_dir} holds a synthetic dataset of {describe(found)}, not "
                         f"{describe(settings)}: delete the folder to generate it again, or give "
                         "another one (DEMO_DATA for run.sh demo)")
    print(f"{out_dir}: the synthetic dataset of these settings, kept ({RECORD})")
    return True


def brats18_cases(list_dir=BRATS18_LISTS):
    """The folders of the official BraTS 2018 lists, relative to the dataset's root, each with
    whether it is labelled: the 285 training cases (MICCAI_BraTS_2018_Data_Training/HGG or
    LGG/<case>, labelled) and the 66 validation cases (MICCAI_BraTS_2018_Data_Validation/<case>,
    no seg file, as the challenge gives them). -> [(relative Path, labelled)]"""
    cases = []
    for name, labelled in (("BraTS18_train_all.csv", True), ("BraTS18_test.csv", False)):
        for _, entry in datalist_entries(Path(list_dir) / name):
            parts = Path(entry).parts
            root = next(i for i, part in enumerate(parts) if part.startswith("MICCAI_BraTS_2018_"))
            cases.append((Path(*parts[root:]), labelled))
    return cases


def generate_brats18(out_dir, shape_xyz=(240, 240, 155), seed=0, fmt="nii.gz"):
    """Write a synthetic case for every case of the official BraTS 2018 lists (brats18_cases)
    under out_dir, in the challenge's layout, so that the official lists, run.sh and eval.sh
    run on it with DATA_ROOT=out_dir; return the case folders. Case k of brats18_cases is
    drawn from np.random.default_rng([seed, k])."""
    _check_format(fmt)
    shape_xyz = _volume_shape(shape_xyz)
    case_dirs = []
    for k, (folder, labelled) in enumerate(brats18_cases()):
        case_dir = Path(out_dir) / folder
        _write_case(case_dir, np.random.default_rng([seed, k]), shape_xyz, fmt, labelled)
        case_dirs.append(case_dir)
    return case_dirs


def main(argv=None):
    p = ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=path_given, required=True,
                   help="output folder (created if needed)")
    p.add_argument("--num_cases", type=int_at_least(1),
                   help="cases of the flat layout (the brats18 layout has the official lists' 351)")
    p.add_argument("--layout", default="flat", choices=LAYOUTS,
                   help="flat: Synth_0000/ ... and train/val/test.csv; brats18: the official "
                        "lists' cases in the challenge's folders (default %(default)s)")
    p.add_argument("--shape", type=volume_shape, default="240,240,155", help="X,Y,Z volume size in voxels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="nii.gz", choices=("nii", "nii.gz"))
    p.add_argument("--reuse", action="store_true",
                   help="keep the dataset the folder holds if it has these settings (a folder of "
                        "other settings is refused)")
    args = p.parse_args(argv)
    if (args.layout == "flat") != (args.num_cases is not None):
        p.error("--num_cases is needed by the flat layout, and has no use in the brats18 layout "
                "(the official lists' 351 cases)")
    shape = args.shape
    check_writable(args.out_dir)  # a file in its place: one line, not the first write's error
    settings = {"layout": args.layout, "num_cases": args.num_cases, "shape": list(shape),
                "seed": args.seed, "format": args.format}
    if args.reuse and reused(args.out_dir, settings):
        return
    start = time.perf_counter()
    (args.out_dir / RECORD).unlink(missing_ok=True)  # until the new dataset is complete
    if args.layout == "brats18":
        cases = generate_brats18(args.out_dir, shape, args.seed, args.format)
        write_text(args.out_dir / RECORD, json.dumps(settings) + "\n")
        print(f"wrote {len(cases)} cases of {'x'.join(map(str, shape))} to {args.out_dir} in the "
              f"BraTS 2018 layout (the official lists' training cases with labels, validation "
              f"cases without) in {time.perf_counter() - start:.1f} s; use it as the data root: "
              f"DATA_ROOT={args.out_dir} bash run.sh ...")
        return
    cases = generate(args.out_dir, args.num_cases, shape, args.seed, args.format)
    write_text(args.out_dir / RECORD, json.dumps(settings) + "\n")
    n_train, n_val, n_test = split_counts(len(cases))
    earlier = sorted(folder.name for folder in Path(args.out_dir).glob(f"{CASE_PREFIX}*")
                     if folder.is_dir() and folder not in cases)
    if earlier:
        print(f"warning: {args.out_dir} also holds {len(earlier)} case folder(s) of an earlier run "
              f"({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}), in none of its "
              "lists: delete them before reading the folder as a whole (eval.py --input)",
              file=sys.stderr)
    print(f"wrote {len(cases)} cases of {'x'.join(map(str, shape))} to {args.out_dir} "
          f"(train {n_train}, val {n_val}, test {n_test}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main)
