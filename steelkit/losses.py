"""Segmentation losses: functions of tensors, thin modules around them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEDiceLoss", "bce_dice_loss", "soft_dice_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - soft Dice`` per class over the whole batch, averaged over the classes present in the batch.

    Pixels of all images are pooled per class (as smp's ``DiceLoss``), so a crop without defects does not reward
    predicting nothing; a class with no positive pixel in the batch is left out of the mean (BCE still covers it).

    Args:
        logits: ``(N, C, H, W)`` raw scores.
        target: ``(N, C, H, W)`` {0, 1}.
        eps: smoothing added to numerator and denominator.
    """
    prob = torch.sigmoid(logits.float())
    target = target.float()
    dims = (0, 2, 3)
    inter = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    loss = 1.0 - (2.0 * inter + eps) / (total + eps)
    present = target.sum(dims) > 0
    if not present.any():
        return loss.sum() * 0.0
    return loss[present].mean()


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> torch.Tensor:
    """``bce_weight * BCE-with-logits + dice_weight * soft Dice loss``; shapes as in :func:`soft_dice_loss`."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce_weight * bce + dice_weight * soft_dice_loss(logits, target)


class BCEDiceLoss(nn.Module):
    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_dice_loss(logits, target, self.bce_weight, self.dice_weight)
