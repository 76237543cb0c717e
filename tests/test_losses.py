"""Losses of the published recipe against hand-computed values."""
import math

import pytest
import torch

from utils.losses import bce_loss, dice_loss, segmentation_loss, soft_dice


def test_soft_dice_by_hand():
    # one sample, one region, 4 voxels: p = (1, .5, 0, 0), g = (1, 1, 0, 0)
    prob = torch.tensor([1.0, 0.5, 0.0, 0.0]).view(1, 1, 4)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    # 2 * 1.5 / (1.5 + 2 + 1)
    assert soft_dice(prob, target).item() == pytest.approx(3.0 / 4.5)


def test_soft_dice_empty_region_scores_zero_not_one():
    # the published +1 smoothing: both empty -> 0 / 1 = 0
    zeros = torch.zeros(1, 1, 8)
    assert soft_dice(zeros, zeros).item() == 0.0


def test_dice_loss_by_hand():
    # 2 samples x 3 regions x 2 voxels; logits +-inf-ish so sigmoid is exactly 0/1
    big = 50.0
    logits = torch.full((2, 3, 2, 1, 1), -big)
    target = torch.zeros(2, 3, 2, 1, 1)
    logits[0, 0, 0] = big; target[0, 0, 0] = 1     # sample 0 ET: p=g=1 voxel -> 2/(1+1+1)
    target[1, 0, 0] = 1                            # sample 1 ET: miss -> 0
    logits[:, 1] = big; target[:, 1] = 1           # WT: p=g=2 voxels -> 4/5 each sample
    # TC: all zero -> 0 each sample
    per_region = [1 - (2 / 3 + 0) / 2, 1 - 4 / 5, 1 - 0]
    assert dice_loss(logits, target).item() == pytest.approx(sum(per_region) / 3, abs=1e-6)


def test_bce_is_sum_over_regions_of_means():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 4, 1, 1).repeat(2, 3, 1, 1, 1)
    logits[:, 1] = 0.0
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 4, 1, 1).repeat(2, 3, 1, 1, 1)

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    region0 = sum(bce(x, y) for x, y in zip([0.0, 2.0, -1.0, 3.0], [1, 0, 0, 1])) / 4
    region1 = 4 * bce(0.0, 1) / 4  # log 2, whatever the target
    assert bce_loss(logits, target).item() == pytest.approx(2 * region0 + region1, rel=1e-6)


def test_total_adds_weighted_kd_and_backpropagates():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    kd = torch.tensor(2.0)
    total, parts = segmentation_loss(logits, target, kd, kd_weight=0.1)
    assert total.item() == pytest.approx(
        (dice_loss(logits, target) + bce_loss(logits, target)).item() + 0.2, rel=1e-6)
    assert set(parts) == {"dice", "bce", "kd"}
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_give_fp32_loss():
    logits = torch.zeros(1, 3, 40, 40, 40, dtype=torch.bfloat16)
    target = torch.ones(1, 3, 40, 40, 40)
    # 64000 voxels: sums in bf16 would round; the loss is computed in fp32
    expected = 1 - 2 * 32000 / (32000 + 64000 + 1)
    assert dice_loss(logits, target).dtype == torch.float32
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
