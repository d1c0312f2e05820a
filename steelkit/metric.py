"""The competition metric: mean Dice over every (image, class) pair (numpy only).

Dice of a pair is ``2 |P & T| / (|P| + |T|)``, and 1 when prediction and truth are both empty, exactly as Kaggle
scored Severstal. The submission's score is the mean over all pairs of the sample submission.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .constants import CLASS_IDS, IMAGE_SHAPE
from .rle import parse_runs, runs_area, runs_intersection

__all__ = ["Score", "dice_from_areas", "dice_masks", "dice_rles", "score_pairs"]


def dice_from_areas(intersection: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    """Per-pair Dice from pixel counts; 1 where both areas are 0. Shapes broadcast; returns float64."""
    intersection = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(truth_area, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * intersection / np.where(total > 0, total, 1.0), 1.0)
    return dice


def dice_masks(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-pair Dice of binary masks.

    Args:
        pred, truth: ``(N, C, H, W)`` (or ``(C, H, W)``) arrays, non-zero = defect.

    Returns:
        ``(N, C)`` (or ``(C,)``) float64 Dice.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    axes = (-2, -1)
    return dice_from_areas((pred & truth).sum(axes), pred.sum(axes), truth.sum(axes))


def dice_rles(pred: str, truth: str, shape: tuple[int, int] = IMAGE_SHAPE) -> float:
    """Dice of two RLE strings, computed on their runs without decoding."""
    p = parse_runs(pred, shape)
    t = parse_runs(truth, shape)
    return float(dice_from_areas(runs_intersection(p, t), runs_area(*p), runs_area(*t)))


@dataclass(frozen=True)
class Score:
    """A submission's score.

    Attributes:
        mean: the competition metric (mean Dice over all pairs).
        per_class: mean Dice over each class's pairs.
        all_empty: the score the all-empty submission would get on the same pairs.
        n_pairs: number of (image, class) pairs scored.
        per_class_all_empty: the all-empty score per class.
    """

    mean: float
    per_class: dict[int, float]
    all_empty: float
    n_pairs: int
    per_class_all_empty: dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        classes = " ".join(f"c{c}={d:.4f}" for c, d in self.per_class.items())
        return f"Dice {self.mean:.4f} ({classes}); all-empty {self.all_empty:.4f}; {self.n_pairs} pairs"


def score_pairs(
    pred: Sequence[str], truth: Sequence[str], class_ids: Sequence[int], shape: tuple[int, int] = IMAGE_SHAPE
) -> Score:
    """Score aligned lists of predicted and true RLE strings.

    Args:
        pred, truth: RLE per pair (``""`` = empty), same length and order.
        class_ids: class of each pair.
        shape: ``(H, W)`` of the images.
    """
    if not (len(pred) == len(truth) == len(class_ids)):
        raise ValueError(f"lengths differ: {len(pred)} predictions, {len(truth)} truths, {len(class_ids)} classes")
    n = len(pred)
    inter = np.zeros(n, dtype=np.int64)
    pred_area = np.zeros(n, dtype=np.int64)
    truth_area = np.zeros(n, dtype=np.int64)
    for i, (p_rle, t_rle) in enumerate(zip(pred, truth)):
        p = parse_runs(p_rle, shape)
        t = parse_runs(t_rle, shape)
        pred_area[i] = runs_area(*p)
        truth_area[i] = runs_area(*t)
        inter[i] = runs_intersection(p, t)
    dice = dice_from_areas(inter, pred_area, truth_area)
    empty = (truth_area == 0).astype(np.float64)
    classes = np.asarray(class_ids)
    per_class = {c: float(dice[classes == c].mean()) for c in CLASS_IDS if (classes == c).any()}
    per_class_empty = {c: float(empty[classes == c].mean()) for c in CLASS_IDS if (classes == c).any()}
    return Score(
        mean=float(dice.mean()) if n else 1.0,
        per_class=per_class,
        all_empty=float(empty.mean()) if n else 1.0,
        n_pairs=n,
        per_class_all_empty=per_class_empty,
    )
