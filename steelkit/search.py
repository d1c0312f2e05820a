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
    "DEFAULT_AREA_FRACTIONS",
    "DEFAULT_THRESHOLDS",
    "ClassSearch",
    "search_class",
    "search_postprocess",
    "summarize",
]

#: pixel thresholds tried by default
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.30, 0.81, 0.05), 2).tolist())
#: minimum mask areas tried by default, as fractions of the image area (0.001 = 410 px of a 256x1600 image)
DEFAULT_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03)


@dataclass(frozen=True)
class ClassSearch:
    """Result of one class's search.

    Attributes:
        threshold, min_area: the best pair (``min_area`` in pixels of the searched arrays).
        dice: mean Dice of the class at the best pair.
        baseline: mean Dice at threshold 0.5 with no minimum area.
        table: ``(T, A)`` mean Dice of every pair, rows = thresholds, columns = areas.
    """

    threshold: float
    min_area: int
    dice: float
    baseline: float
    table: np.ndarray


def _counts(probs: np.ndarray, truth: np.ndarray, threshold: float):
    pred = probs >= threshold_level(threshold, probs.dtype)
    return (pred & truth).sum((1, 2)), pred.sum((1, 2))


def search_class(
    probs: np.ndarray, truth: np.ndarray, thresholds: Sequence[float], min_areas: Sequence[int]
) -> ClassSearch:
    """Exhaustive search of one class.

    Args:
        probs: ``(N, H, W)`` uint8 (x 255) or float probabilities of one class.
        truth: ``(N, H, W)`` {0, 1} truth.
        thresholds: pixel thresholds in [0, 1].
        min_areas: whole-mask minimum areas in pixels of ``probs``.

    Ties keep the first best pair in (threshold, area) order.
    """
    truth = truth.astype(bool, copy=False)
    truth_area = truth.sum((1, 2))
    areas = np.asarray(min_areas)[:, None]  # (A, 1)
    empty = dice_from_areas(0, 0, truth_area)  # (N,)
    table = np.zeros((len(thresholds), len(min_areas)))
    for i, t in enumerate(thresholds):
        inter, pred_area = _counts(probs, truth, t)
        dice = dice_from_areas(inter, pred_area, truth_area)  # (N,)
        table[i] = np.where(pred_area[None] >= areas, dice[None], empty[None]).mean(1)
    best = np.unravel_index(np.argmax(table), table.shape)
    inter, pred_area = _counts(probs, truth, 0.5)
    baseline = float(dice_from_areas(inter, pred_area, truth_area).mean())
    return ClassSearch(float(thresholds[best[0]]), int(min_areas[best[1]]), float(table[best]), baseline, table)


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
    h, w = probs.shape[-2:]
    min_areas = sorted({int(round(f * h * w)) for f in area_fractions})
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
    }
