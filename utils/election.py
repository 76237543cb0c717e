"""Teacher election, as published: which single modality segments each region best.

Every validation case is predicted with each modality alone (sliding window, logits averaged
over windows, one encoder pass per window for the four singles); per case and region the soft
Dice 2*sum(p*g) / (sum(p) + sum(g) + 1) on the probabilities is added to a running sum. Per
region the modality with the largest sum wins (ties: the lower index, as published); the
teacher set is the sorted union of the winners.

`elect` evaluates this rank's shard of the cases and sums over ranks, so every rank gets the
same result. The pure core, `winners`, is array-in, array-out; the TensorBoard overlay of a
validation slice is `overlay.overlay_panel`.
"""
import json
from pathlib import Path

import numpy as np
import torch

from datasets.brats import DataError
from utils import distributed
from utils.inference import predict_subsets
from utils.io import write_text
from utils.losses import soft_dice
from utils.modalities import MODALITIES, SINGLE_SUBSETS
from utils.overlay import tumour_slice
from utils.regions import PRESENT_ABOVE, REGIONS, labels_to_regions


def winners(dice_sums):
    """dice_sums (S, R) -> list of R winning modality indices (argmax over S; first on ties)."""
    dice_sums = np.asarray(dice_sums)
    return [int(SINGLE_SUBSETS[s][0]) for s in dice_sums.argmax(axis=0)]


def elect(model, cases, window, overlap=1 / 3, batch_size=2, amp="off", device=None,
          dist_info=distributed.Dist(), stop_requested=None):
    """Run the election on `cases` (datasets.preprocess.CachedCase: .name, .normalized() the
    image float32 (4,D,H,W), .full_label() the label map (D,H,W)).

    Cases are split round-robin over ranks and the Dice sums all-reduced.
    Returns dict: dice {modality: {region: summed Dice}}, winners {region: modality},
    teachers [indices], num_cases, and `sample` (rank 0's first case: a (4, H, W) image slice,
    the ground truth and every modality's predicted regions on it) for the TensorBoard overlay.

    stop_requested: a callable asked after every case (a stop signal): when it says True on
    any rank, every rank abandons the election and gets None. An election of the full model
    takes minutes, longer than a scheduler's or torchrun's grace period after SIGTERM.
    """
    if device is None:
        device = next(model.parameters()).device
    sums = torch.zeros(len(SINGLE_SUBSETS), len(REGIONS), dtype=torch.float64, device=device)
    sample = None
    mine = cases[dist_info.rank::dist_info.world_size]
    rounds = -(-len(cases) // dist_info.world_size)  # the same count of stop checks on every rank
    for index in range(rounds):
        if (stop_requested is not None and index > 0
                and distributed.any_rank(stop_requested(), dist_info, device)):
            return None
        if index == len(mine):  # this rank's share is done; it still joins the checks
            continue
        case = mine[index]
        label = case.full_label()
        # No CLI gets here with an unlabelled case (train.py preprocesses its validation list
        # with require_label=True, bench_train elects on synthetic cases): a guard for other
        # callers, whose None would otherwise fail in expand_as without naming the case.
        if label is None:
            raise ValueError(f"validation case {case.name} has no segmentation: the teacher "
                             "election needs labelled validation cases")
        image = case.normalized()
        # As published, the election averages the windows' logits (the export, probabilities).
        probs = predict_subsets(model, image, SINGLE_SUBSETS, window, "logits", overlap=overlap,
                                batch_size=batch_size, device=device, amp=amp)  # (S, 3, D, H, W)
        target = torch.from_numpy(labels_to_regions(label)).to(device)
        sums += soft_dice(probs, target.expand_as(probs)).double()  # (S, 3)
        if sample is None:
            sample = _slice_sample(case.name, image, label, probs, target)
    distributed.all_reduce_sum(sums, dist_info)
    num_cases = len(cases)
    sums = sums.cpu().numpy()
    winning = winners(sums)
    return {
        "dice": {MODALITIES[s[0]]: {r: float(sums[i, j]) for j, r in enumerate(REGIONS)}
                 for i, s in enumerate(SINGLE_SUBSETS)},
        "winners": {r: MODALITIES[m] for r, m in zip(REGIONS, winning)},
        "teachers": sorted(set(winning)),
        "num_cases": num_cases,
        "sample": sample,
    }


def _slice_sample(name, image, label, probs, target):
    """The axial slice (along D) with the most tumour, for the overlay."""
    d = tumour_slice(label)
    return {
        "name": name,
        "slice": d,
        "image": image[:, d].copy(),  # (4, H, W)
        "truth": target[:, d].cpu().numpy().astype(bool),  # (3, H, W)
        "pred": (probs[:, :, d] > PRESENT_ABOVE).cpu().numpy(),  # (S, 3, H, W)
    }


def mean_dice(result):
    """{modality: {region: soft Dice averaged over the election's cases}}."""
    n = max(result["num_cases"], 1)
    return {name: {r: dice / n for r, dice in per_region.items()}
            for name, per_region in result["dice"].items()}


def teacher_names(result):
    return ", ".join(MODALITIES[t] for t in result["teachers"])


def format_result(result, iteration):
    """Printable table: one row per modality, Dice averaged over cases, winners marked '*'."""
    lines = [f"teacher election at iteration {iteration} ({result['num_cases']} val cases, "
             "mean soft Dice)", "modality  " + "".join(f"{r:>8}" for r in REGIONS)]
    for name, per_region in mean_dice(result).items():
        cells = "".join(f"{per_region[r]:>7.4f}{'*' if result['winners'][r] == name else ' '}"
                        for r in REGIONS)
        lines.append(f"{name:<10}{cells}")
    lines.append("teachers: " + teacher_names(result))
    return "\n".join(lines)


def read_history(path):
    """The election history at `path`, a JSON list ([] without the file); DataError naming the
    file when it is not one (train.py reads it when a run resumes, before any training)."""
    path = Path(path)
    try:
        history = json.loads(path.read_text()) if path.exists() else []
        if not (isinstance(history, list) and all(isinstance(entry, dict) and isinstance(
                entry.get("iteration"), int) for entry in history)):
            raise ValueError("not a list of elections, each with its iteration")
    except ValueError as error:
        raise DataError(f"{path} is not an election history ({type(error).__name__}: {error}); "
                        "restore it, or delete it to start a new one") from None
    return history


def append_history(path, result, iteration):
    """Add this election to the JSON list at `path` (atomically).

    Entries at or after `iteration` are dropped first: a run resumed from an earlier
    checkpoint repeats those elections, and the history follows the run that continues.
    """
    history = [entry for entry in read_history(path) if entry["iteration"] < iteration]
    history.append({
        "iteration": int(iteration),
        "num_cases": result["num_cases"],
        "dice": result["dice"],
        "winners": result["winners"],
        "teachers": [MODALITIES[t] for t in result["teachers"]],
    })
    write_text(path, json.dumps(history, indent=2) + "\n", durable=True)  # read back on resume
    return history
