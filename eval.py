"""Export segmentation masks (and, when the list has labels, score them) for modality subsets.

Examples (from the repository root):

    # the published command: full-modality masks for the online validation set
    # (--data_dir datalist/ holds the lists; their entries point at ../data/BraTS-2018/...)
    python eval.py --input_size 80,160,160 --num_classes 3 --data_list BraTS18/BraTS18_test.csv \
        --weight_std True --restore_from snapshots/LCKD_stage2/final.pth --mode 0,1,2,3
    # all 15 subsets in one pass (the encoder runs once per window for all of them), scored
    # against the labels of a validation list, with the paper's table printed at the end
    python eval.py --data_list BraTS18/BraTS18_val.csv --data_root /data/BraTS2018 \
        --restore_from snapshots/LCKD_stage2/final.pth --mode all --output_dir outputs/val

The network is rebuilt from the configuration stored in the checkpoint (model size, weight
standardisation, norm, activation, patch size); flags given on the command line override it.

Writes, under --output_dir:
    <subset>/<case>.nii.gz   one uint8 mask per case and subset (e.g. flair+t1ce/Brats18_X.nii.gz),
                             on the input images' grid, labels 0/1/2/4
    eval_config.json         the resolved settings
and when the cases have labels:
    metrics.csv              case, subset, region, dice, hd95, sensitivity, specificity
    summary.csv, summary.md  the paper's table: one row per subset, Dice (%) and HD95 (mm) of
                             ET/TC/WT, and the mean over the subsets
"""
import argparse
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from datasets.brats import load_case, read_datalist, resolve_list
from datasets.normalize import normalize_case
from models import LCKD, LCKDConfig
from utils.checkpoint import load_checkpoint
from utils.cli import str2bool
from utils.export import probabilities_to_labels, save_labels
from utils.inference import AMP_DTYPES, predict_subsets
from utils.io import atomic_path, write_text
from utils.metrics import DEFAULT_HD95_METHOD, HD95_METHODS, region_metrics
from utils.modalities import ALL_SUBSETS, parse_mode, subset_name

PUBLISHED_INPUT_SIZE = "80,160,160"
TABLE_REGIONS = ("ET", "TC", "WT")  # the paper's column order
TABLE_MODALITIES = ("FLAIR", "T1", "T1ce", "T2")  # MODALITIES as the paper writes them
PRESENT, ABSENT = "●", "○"


def fraction(text):
    """'1/3' or '0.333' -> float."""
    return float(Fraction(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="datalist/",
                   help="folder --data_list is looked up in when not found as given (published)")
    g.add_argument("--data_list", default="BraTS18/BraTS18_test.csv")
    g.add_argument("--data_root", default=None,
                   help="re-base the list's case folders onto this folder (see datasets.brats)")
    g.add_argument("--output_dir", default="outputs")
    g = p.add_argument_group("model (default: from the checkpoint's config)")
    g.add_argument("--restore_from", required=True, help="checkpoint (.pth) written by train.py")
    g.add_argument("--input_size", default=None,
                   help=f"sliding-window size D,H,W (default: the training patch, else {PUBLISHED_INPUT_SIZE})")
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--weight_std", type=str2bool, default=None)
    g.add_argument("--norm_cfg", choices=("IN", "BN"), default=None)
    g.add_argument("--activation_cfg", choices=("LeakyReLU", "ReLU"), default=None)
    g.add_argument("--model_size", choices=("full", "small"), default=None)
    g = p.add_argument_group("inference")
    g.add_argument("--mode", default="0,1,2,3",
                   help="one subset ('0,2' or 'flair,t1ce') or 'all' for the 15 subsets")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--overlap", type=fraction, default=1 / 3)
    g.add_argument("--gaussian", action="store_true", help="Gaussian window weighting (nnU-Net)")
    g.add_argument("--mirror", action="store_true", help="average over the 8 axis flips (8x slower)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off")
    g.add_argument("--batch_size", type=int, default=2, help="windows per forward pass")
    g.add_argument("--hd95", choices=HD95_METHODS, default=DEFAULT_HD95_METHOD,
                   help="'max' of the two directed 95th percentiles (MONAI/DeepMind) or 'pooled' (MedPy)")
    g.add_argument("--workers", type=int, default=4,
                   help="threads writing masks and computing metrics while the next case runs")
    return p.parse_args(argv)


def resolve_model_config(args, saved):
    """Checkpoint config + explicit flags -> (LCKDConfig, window (d, h, w))."""
    pick = lambda flag, key, default: flag if flag is not None else saved.get(key, default)
    config = LCKDConfig.from_name(
        pick(args.model_size, "model_size", "full"),
        weight_std=pick(args.weight_std, "weight_std", True),
        norm=pick(args.norm_cfg, "norm_cfg", "IN"),
        activation=pick(args.activation_cfg, "activation_cfg", "LeakyReLU"),
    )
    if args.num_classes != config.num_classes:
        raise ValueError(f"--num_classes {args.num_classes}: the network predicts "
                         f"{config.num_classes} regions (ET, WT, TC)")
    size = pick(args.input_size, "input_size", PUBLISHED_INPUT_SIZE)
    window = tuple(int(v) for v in (size.split(",") if isinstance(size, str) else size))
    if len(window) != 3:
        raise ValueError(f"--input_size needs D,H,W, got {size!r}")
    return config, window


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(args, device):
    checkpoint = load_checkpoint(args.restore_from)
    # A bare state_dict (no "model" key) carries no config: the flags / published defaults apply.
    state, saved = ((checkpoint["model"], checkpoint.get("config", {})) if "model" in checkpoint
                    else (checkpoint, {}))
    config, window = resolve_model_config(args, saved)
    model = LCKD(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"checkpoint {args.restore_from} does not fit the network {config}: "
                           f"{error}") from error
    return model.to(device).eval(), config, window


def export_and_score(case, subset, label, output_dir, hd95_method):
    """Write one subset's mask (D, H, W) of one case; return its metric rows ([] without a label)."""
    name = subset_name(subset)
    save_labels(label, case.affine, case.header, Path(output_dir) / name / f"{case.name}.nii.gz")
    if case.label is None:
        return []
    scores = region_metrics(label, case.label, case.spacing, hd95_method=hd95_method)
    return [{"case": case.name, "subset": name, "region": region, **values}
            for region, values in scores.items()]


def summary_table(metrics, subsets):
    """Per-case metrics -> the paper's table: one row per subset (in `subsets` order) + mean.

    Dice in %, HD95 in mm, each averaged over the cases; the mean row averages the subsets.
    """
    means = metrics.groupby(["subset", "region"])[["dice", "hd95"]].mean()
    rows = []
    for subset in subsets:
        row = {"subset": subset_name(subset)}
        row.update({m: PRESENT if i in subset else ABSENT for i, m in enumerate(TABLE_MODALITIES)})
        for r in TABLE_REGIONS:
            row[f"{r} Dice"] = 100 * means.loc[(subset_name(subset), r), "dice"]
        for r in TABLE_REGIONS:
            row[f"{r} HD95"] = means.loc[(subset_name(subset), r), "hd95"]
        rows.append(row)
    table = pd.DataFrame(rows)
    numeric = [c for c in table.columns if c.endswith(("Dice", "HD95"))]
    mean = {c: "" for c in table.columns} | {"subset": "mean"} | table[numeric].mean().to_dict()
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def markdown(table):
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, row in table.iterrows():
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    mode = parse_mode(args.mode)
    if mode == "random":
        raise ValueError("--mode random is a training mode: give a subset (e.g. 0,2) or 'all'")
    subsets = list(ALL_SUBSETS) if mode == "all" else [mode]
    device = resolve_device(args.device)
    output_dir = Path(args.output_dir)
    model, config, window = load_model(args, device)
    cases = read_datalist(resolve_list(args.data_list, args.data_dir), args.data_root)
    write_text(output_dir / "eval_config.json", json.dumps(
        vars(args) | {"subsets": [subset_name(s) for s in subsets], "window": window,
                      "device": str(device), "model": config.to_dict()}, indent=2, default=str))

    def read(case_dir):
        case = load_case(case_dir)
        case.image = normalize_case(case)
        return case

    rows = []
    # Reading the next case, and writing / scoring the previous ones, overlap with the
    # network's work on the current case; at most two cases wait for the writers.
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(args.workers) as writers:
        waiting = deque()
        next_case = reader.submit(read, cases[0]) if cases else None
        for i in tqdm(range(len(cases)), desc="cases", unit="case"):
            case = next_case.result()
            if i + 1 < len(cases):
                next_case = reader.submit(read, cases[i + 1])
            probs = predict_subsets(model, case.image, subsets, window, overlap=args.overlap,
                                    gaussian=args.gaussian, batch_size=args.batch_size,
                                    mirror=args.mirror, device=device, amp=args.amp)
            labels = [probabilities_to_labels(p) for p in probs]
            del probs
            case.image = None  # the writers need the label and the grid, not the image
            waiting.append([writers.submit(export_and_score, case, s, label, output_dir, args.hd95)
                            for s, label in zip(subsets, labels)])
            if len(waiting) > 2:
                rows += [row for future in waiting.popleft() for row in future.result()]
        while waiting:
            rows += [row for future in waiting.popleft() for row in future.result()]

    print(f"masks of {len(cases)} cases x {len(subsets)} subset(s) written to {output_dir}")
    if not rows:
        return None
    metrics = pd.DataFrame(rows)
    table = summary_table(metrics, subsets)
    for name, df in (("metrics.csv", metrics), ("summary.csv", table)):
        with atomic_path(output_dir / name) as tmp:
            df.to_csv(tmp, index=False)
    text = markdown(table)
    write_text(output_dir / "summary.md", text)
    print(f"\n{metrics['case'].nunique()} labelled cases, Dice (%) and HD95 (mm, {args.hd95}):\n")
    print(text)
    return table


if __name__ == "__main__":
    main()
