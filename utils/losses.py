"""Segmentation losses of the published LCKD recipe.

    loss = dice_loss(logits, regions) + bce_loss(logits, regions) + kd_weight * kd

The regions (ET, WT, TC) overlap, so every output channel is an independent sigmoid; there is
no softmax over classes. `soft_dice` is also the score of the teacher election
(utils/election.py), which is why it works on probabilities, not on logits.
"""
import torch
import torch.nn.functional as F

SMOOTH = 1.0  # published: 2*sum(p*g) / (sum(p) + sum(g) + 1)


def soft_dice(prob, target):
    """Soft Dice per sample and region.

    prob, target: (N, R, ...) probabilities / {0,1} masks.
    Returns (N, R): 2*sum(p*g) / (sum(p) + sum(g) + 1) over the spatial axes. The +1 (not an
    epsilon) is published: an empty prediction on an empty region scores 0, not 1, which is
    why this is a training / election score and not the BraTS metric (utils/metrics.py).
    """
    prob = prob.flatten(2).float()  # fp32 sums: a 80x160x160 patch overflows fp16
    target = target.flatten(2).float()
    intersection = (prob * target).sum(-1)
    return 2 * intersection / (prob.sum(-1) + target.sum(-1) + SMOOTH)


def dice_loss(logits, target):
    """Published Dice loss: per region 1 - mean over the batch of soft Dice, averaged over regions.

    logits, target: (N, R, D, H, W). Returns a scalar.
    """
    dice = soft_dice(torch.sigmoid(logits.float()), target)  # (N, R)
    return (1 - dice.mean(0)).mean()


def bce_loss(logits, target):
    """Published BCE: binary cross-entropy with logits averaged per region, summed over regions.

    logits, target: (N, R, D, H, W). Returns a scalar (3x the voxel-mean for 3 regions).
    """
    per_region = F.binary_cross_entropy_with_logits(
        logits.float(), target.float(), reduction="none"
    ).flatten(2).mean(dim=(0, 2))  # (R,)
    return per_region.sum()


def segmentation_loss(logits, target, kd, kd_weight=0.1):
    """Total loss and its parts: (total, {"dice", "bce", "kd"}), all scalar tensors."""
    dice = dice_loss(logits, target)
    bce = bce_loss(logits, target)
    kd = kd.float()
    return dice + bce + kd_weight * kd, {"dice": dice, "bce": bce, "kd": kd}
