"""Per-class pixel threshold and minimum-area search over cached out-of-fold probabilities (numpy only).

The search is exact for the competition metric: for every threshold, the Dice of each image is computed once from
pixel counts, and every minimum area is then a vectorised choice between that Dice and the empty prediction's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metric import dice_from_areas
from .postprocess import PostProcess, threshold_level

__all__ = [
    "class_counts",
    "table_from_counts",
    "best_of_table",
    "area_grid",
    "DEFAULT_AREA_FRACTIONS",
    "DEFAULT_THRESHOLDS",
    "ClassSearch",
    "search_class",
    "search_postprocess",
    "summarize",
]

#: pixel thresholds tried by default
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.10, 0.91, 0.05), 2).tolist())
#: minimum mask areas tried by default, as fractions of the image area (0.001 = 410 px of a 256x1600 image)
DEFAULT_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03)


@dataclass(frozen=True)
class ClassSearch:
    """Result of one class's search.

    Attributes:
        threshold, min_area: the best pair (``min_area`` in pixels of the searched arrays).
        dice: mean Dice of the class at the best pair.
        baseline: mean Dice at threshold 0.5 with no minimum area.
        empty: mean Dice of the all-empty prediction (the fraction of images without the class).
        table: ``(T, A)`` mean Dice of every pair, rows = thresholds, columns = areas.
    """

    threshold: float
    min_area: int
    dice: float
    baseline: float
    empty: float
    table: np.ndarray


def class_counts(probs: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]):
    """Pixel counts of one class at every threshold.

    Args:
        probs: ``(N, H, W)`` uint8 (x 255) or float probabilities.
        truth: ``(N, H, W)`` {0, 1}.

    Returns:
        ``(intersection, pred_area, truth_area)``: ``(T, N)``, ``(T, N)`` and ``(N,)`` int64.
    """
    truth = truth.astype(bool, copy=False)
    inter = np.zeros((len(thresholds), len(probs)), dtype=np.int64)
    pred_area = np.zeros_like(inter)
    for i, t in enumerate(thresholds):
        pred = probs >= threshold_level(t, probs.dtype)
        inter[i] = (pred & truth).sum((1, 2))
        pred_area[i] = pred.sum((1, 2))
    return inter, pred_area, truth.sum((1, 2))


def table_from_counts(
    inter: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray, min_areas: Sequence[int]
) -> np.ndarray:
    """Mean Dice of every (threshold, minimum area) pair from :func:`class_counts`: ``(T, A)``.

    A prediction whose area is below the minimum becomes empty, which scores 1 on a clean image and 0 otherwise.
    """
    dice = dice_from_areas(inter, pred_area, truth_area[None])  # (T, N)
    empty = dice_from_areas(0, 0, truth_area)  # (N,)
    keep = pred_area[:, None, :] >= np.asarray(min_areas)[None, :, None]  # (T, A, N)
    return np.where(keep, dice[:, None, :], empty[None, None, :]).mean(2)


def best_of_table(table: np.ndarray) -> tuple[int, int]:
    """Index of the best (threshold, area) pair; ties keep the first in (threshold, area) order."""
    return np.unravel_index(np.argmax(table), table.shape)


def search_class(
    probs: np.ndarray, truth: np.ndarray, thresholds: Sequence[float], min_areas: Sequence[int]
) -> ClassSearch:
    """Exhaustive search of one class.

    Args:
        probs: ``(N, H, W)`` uint8 (x 255) or float probabilities of one class.
        truth: ``(N, H, W)`` {0, 1} truth.
        thresholds: pixel thresholds in [0, 1].
        min_areas: whole-mask minimum areas in pixels of ``probs``.
    """
    inter, pred_area, truth_area = class_counts(probs, truth, list(thresholds) + [0.5])
    table = table_from_counts(inter[:-1], pred_area[:-1], truth_area, min_areas)
    best = best_of_table(table)
    baseline = float(dice_from_areas(inter[-1], pred_area[-1], truth_area).mean())
    empty = float(dice_from_areas(0, 0, truth_area).mean())
    return ClassSearch(float(thresholds[best[0]]), int(min_areas[best[1]]), float(table[best]), baseline, empty, table)


def area_grid(shape: tuple[int, int], fractions: Sequence[float] = DEFAULT_AREA_FRACTIONS) -> list[int]:
    """Minimum areas in pixels of an ``(H, W)`` image from fractions of its area."""
    return sorted({int(round(f * shape[0] * shape[1])) for f in fractions})


def search_postprocess(
    probs: np.ndarray,
    truth: np.ndarray,
    full_area_scale: float = 1.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    area_fractions: Sequence[float] = DEFAULT_AREA_FRACTIONS,
) -> tuple[PostProcess, list[ClassSearch]]:
    """Search every class.

    Args:
        probs: ``(N, 4, H, W)`` out-of-fold probabilities (uint8 x 255 or float).
        truth: ``(N, 4, H, W)`` {0, 1}.
        full_area_scale: full-resolution pixels per pixel of ``probs`` (``1 / scale ** 2``); the returned
            ``PostProcess`` holds areas in full-resolution pixels.
        thresholds, area_fractions: the grid; areas are fractions of ``H * W``.
    """
    min_areas = area_grid(probs.shape[-2:], area_fractions)
    results = [search_class(probs[:, c], truth[:, c], thresholds, min_areas) for c in range(probs.shape[1])]
    settings = PostProcess(
        pixel_threshold=tuple(r.threshold for r in results),
        min_area=tuple(int(round(r.min_area * full_area_scale)) for r in results),
    )
    return settings, results


def summarize(results: Sequence[ClassSearch]) -> dict[str, list]:
    """JSON-friendly summary of a search."""
    return {
        "threshold": [r.threshold for r in results],
        "min_area": [r.min_area for r in results],
        "dice": [r.dice for r in results],
        "baseline": [r.baseline for r in results],
        "empty": [r.empty for r in results],
    }
