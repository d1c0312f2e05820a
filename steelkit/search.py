"""Per-class post-processing search over cached out-of-fold probabilities (numpy + OpenCV, no torch).

Both searches are exact for the competition metric (mean Dice over images, empty on empty = 1):

* :func:`search_postprocess` (pixel threshold x whole-mask minimum area): for every threshold, the Dice of each image
  is computed once from pixel counts, and every minimum area is then a vectorised choice between that Dice and the
  empty prediction's.
* :func:`search_full` (pixel threshold x component minimum size x label-gate threshold x whole-mask minimum area):
  components are labelled once per (image, threshold) (:func:`component_counts`), every component minimum size is a
  sum over the components that survive it, and the label gate and minimum area are vectorised choices between the
  image's Dice and the empty prediction's. A split-half guard keeps a class's defaults when the searched setting does
  not beat them on held-out images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .metric import dice_from_areas
from .postprocess import PostProcess, label_components, label_scores, threshold_level

__all__ = [
    "class_counts",
    "table_from_counts",
    "best_of_table",
    "area_grid",
    "DEFAULT_AREA_FRACTIONS",
    "DEFAULT_THRESHOLDS",
    "ClassSearch",
    "search_class",
    "search_classes",
    "search_postprocess",
    "summarize",
    "DEFAULT_MIN_COMPONENTS",
    "DEFAULT_LABEL_THRESHOLDS",
    "TIE_TOLERANCE",
    "SearchGrid",
    "component_counts",
    "weighted_tables",
    "class_table",
    "best_cell",
    "ClassResult",
    "FullSearch",
    "search_full",
]

#: pixel thresholds tried by default
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.10, 0.91, 0.05), 2).tolist())
#: minimum mask areas tried by default, as fractions of the image area (0.001 = 410 px of a 256x1600 image)
DEFAULT_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03)
#: connected-component minimum sizes tried by default, in pixels of the searched arrays (16 = 64 full-resolution
#: pixels at scale 0.5)
DEFAULT_MIN_COMPONENTS = (0, 16, 32, 64, 128)
#: label-gate thresholds tried by default (0 = gate off); with the ``"max_prob"`` source only those above the pixel
#: threshold change anything
DEFAULT_LABEL_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: mean-Dice differences up to this are ties (and held-out gains up to this count as no gain)
TIE_TOLERANCE = 1e-9


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


def search_classes(
    probs: np.ndarray,
    truth: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    area_fractions: Sequence[float] = DEFAULT_AREA_FRACTIONS,
) -> list[ClassSearch]:
    """:func:`search_class` for every channel of ``(N, C, H, W)`` probabilities and truth (any C: a per-class binary
    model has one); minimum areas are fractions of ``H * W``, as :func:`area_grid`."""
    min_areas = area_grid(probs.shape[-2:], area_fractions)
    return [search_class(probs[:, c], truth[:, c], thresholds, min_areas) for c in range(probs.shape[1])]


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
    results = search_classes(probs, truth, thresholds, area_fractions)
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


# --------------------------------------------------------------------------------------------------------------------
# Joint search: pixel threshold x component minimum size x label gate x whole-mask minimum area, with an overfit guard


@dataclass(frozen=True)
class SearchGrid:
    """The values the joint search tries for every class; tables have the axes ``(T, M, L, A)`` in this order.

    Every axis is stored sorted and without duplicates.

    Attributes:
        thresholds: ``T`` pixel thresholds in [0, 1].
        min_components: ``M`` connected-component minimum sizes in pixels of the searched arrays (0 = keep all).
        label_thresholds: ``L`` label-gate thresholds in [0, 1] (0 = gate off).
        area_fractions: whole-mask minimum areas as fractions of the searched image area (:func:`area_grid`).
        min_areas: ``A`` whole-mask minimum areas in pixels of the searched arrays; replaces ``area_fractions`` when
            given.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    min_components: tuple[float, ...] = DEFAULT_MIN_COMPONENTS
    label_thresholds: tuple[float, ...] = DEFAULT_LABEL_THRESHOLDS
    area_fractions: tuple[float, ...] = DEFAULT_AREA_FRACTIONS
    min_areas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("thresholds", "min_components", "label_thresholds", "area_fractions", "min_areas"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(sorted(set(values)))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"SearchGrid.{name} is empty")
            if min(values) < 0:
                raise ValueError(f"SearchGrid.{name} must be >= 0, got {list(values)}")
        for name in ("thresholds", "label_thresholds", "area_fractions"):
            if max(getattr(self, name)) > 1:
                raise ValueError(f"SearchGrid.{name} must lie in [0, 1], got {list(getattr(self, name))}")

    def areas(self, shape: tuple[int, int]) -> list[float]:
        """Whole-mask minimum areas in pixels of an ``(H, W)`` searched array: ``min_areas`` or from the fractions."""
        return list(self.min_areas) if self.min_areas is not None else area_grid(shape, self.area_fractions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": list(self.thresholds),
            "min_components": list(self.min_components),
            "label_thresholds": list(self.label_thresholds),
            "area_fractions": list(self.area_fractions),
            "min_areas": None if self.min_areas is None else list(self.min_areas),
        }


def _levels(thresholds: Sequence[float], dtype: np.dtype) -> np.ndarray:
    """``(T,)`` comparison levels; int64 for uint8, float64 otherwise (floats compare in float64, as binarize does)."""
    return np.array([threshold_level(t, dtype) for t in thresholds], dtype=np.int64 if dtype == np.uint8 else float)


def _sum_kept(level: np.ndarray, area: np.ndarray, inter: np.ndarray, sizes: np.ndarray, out: np.ndarray) -> None:
    """Add the area and intersection of every component that survives each minimum size to ``out``.

    Args:
        level, area, inter: ``(K,)`` level index, area and truth intersection of each component.
        sizes: ``(S,)`` component minimum sizes.
        out: ``(2, levels, S)`` int64 running sums (area, intersection), updated in place.
    """
    keep = area[:, None] >= sizes[None, :]  # (K, S)
    cell = (level[:, None] * len(sizes) + np.arange(len(sizes))[None, :])[keep]  # flat (level, size) of kept pairs
    for k, values in enumerate((area, inter)):
        out[k] += (
            np.bincount(cell, np.broadcast_to(values[:, None], keep.shape)[keep], out[k].size)
            .reshape(out[k].shape)
            .astype(np.int64)
        )


def _pack(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop each ``(h, w)`` tile of a ``(K, h, w)`` uint8 stack to the box of its non-zero pixels and stack the boxes
    in one image, a zero row under each, so that no component spans two tiles (every tile must hold a pixel).

    Returns:
        ``(canvas, offsets)``: the uint8 image and the ``(K + 1,)`` first row of each tile in it (then its height).
    """
    rows, cols = tiles.any(2), tiles.any(1)  # (K, h), (K, w)
    top, bottom = rows.argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
    left, right = cols.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
    offsets = np.concatenate([[0], np.cumsum(bottom - top + 1)])
    canvas = np.zeros((offsets[-1], (right - left).max()), dtype=np.uint8)
    for k in range(len(tiles)):
        canvas[offsets[k] : offsets[k + 1] - 1, : right[k] - left[k]] = tiles[k, top[k] : bottom[k], left[k] : right[k]]
    return canvas, offsets


def component_counts(
    probs: np.ndarray, truth: np.ndarray, thresholds: Sequence[float], min_components: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts of one class after the threshold and the component filter, at every (threshold, minimum size).

    Components are 8-connected, as in :func:`steelkit.postprocess.remove_small_components`, and a component is kept
    when its area is ``>= min_component``. Sizes ``<= 1`` keep every pixel, so they are plain pixel counts. For the
    others, an image's mask at the lowest threshold is labelled once; a component at a higher threshold lies inside
    one of those, so only those at least as large as the smallest size are labelled again, at all the higher
    thresholds their pixels reach in a single OpenCV call (tiles stacked with a zero row between them). Images with no
    pixel above the lowest threshold cost nothing.

    Args:
        probs: ``(N, H, W)`` uint8 (x 255) or float probabilities.
        truth: ``(N, H, W)`` {0, 1}.
        thresholds: ``T`` pixel thresholds in [0, 1].
        min_components: ``M`` component minimum sizes in pixels of ``probs``.

    Returns:
        ``(kept_area, kept_intersection, truth_area)``: ``(T, M, N)``, ``(T, M, N)`` and ``(N,)`` int64.
    """
    if probs.shape != truth.shape or probs.ndim != 3:
        raise ValueError(f"probs {probs.shape} and truth {truth.shape} must both be (N, H, W)")
    levels, where = np.unique(_levels(thresholds, probs.dtype), return_inverse=True)  # ascending distinct levels
    sizes = np.asarray(min_components, dtype=np.float64)
    plain = sizes <= 1  # every component is kept: pixel counts
    big = sizes[~plain]
    smallest = big.min() if len(big) else np.inf
    n, n_u = len(probs), len(levels)
    counts = np.zeros((n, 2, n_u, len(sizes)), dtype=np.int64)  # (image, area / intersection, level, size)
    truth_area = np.fromiter((np.count_nonzero(m) for m in truth), dtype=np.int64, count=n)  # faster than axis=
    peaks = probs.reshape(n, -1).max(axis=1)
    for i in np.flatnonzero(peaks >= levels[0]):
        on = probs[i] >= levels[0]
        rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        crop, on, hit = probs[i][box], on[box], truth[i][box].astype(bool)
        for k, mask in enumerate((on, on & hit)):  # pixels >= each level: reversed cumulative histogram of ranks
            ranks = np.bincount(np.searchsorted(levels, crop[mask], side="right"), minlength=n_u + 1)
            counts[i, k][:, plain] = np.cumsum(ranks[::-1])[::-1][1:, None]
        if not len(big):
            continue
        found = np.zeros((2, n_u, len(big)), dtype=np.int64)
        n_low, low, stats = label_components(on.view(np.uint8), stats=True)
        area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
        inter = np.bincount(low[hit], minlength=n_low)[1:]
        _sum_kept(np.zeros(n_low - 1, dtype=np.int64), area, inter, big, found)
        for j in np.flatnonzero(area >= smallest) + 1:  # relabel large components at the higher levels
            x, y, w, h = stats[j, :4]
            sub, inside = crop[y : y + h, x : x + w], low[y : y + h, x : x + w] == j
            higher = levels[1 : np.searchsorted(levels, sub[inside].max(), side="right")]
            if not len(higher):
                continue
            tiles = (sub[None] >= higher[:, None, None]) & inside  # (K, h, w)
            canvas, offsets = _pack(tiles.view(np.uint8) << hit[y : y + h, x : x + w].view(np.uint8))  # 2 = truth
            n_sub, labels, sub_stats = label_components(canvas, stats=True)
            level = np.searchsorted(offsets, sub_stats[1:, cv2.CC_STAT_TOP], side="right")  # 1 + tile index
            sub_inter = np.bincount(labels[canvas == 2], minlength=n_sub)
            _sum_kept(level, sub_stats[1:, cv2.CC_STAT_AREA].astype(np.int64), sub_inter[1:], big, found)
        counts[i][:, :, ~plain] = found
    counts = counts[:, :, where].transpose(1, 2, 3, 0)  # (2, T, M, N)
    return np.ascontiguousarray(counts[0]), np.ascontiguousarray(counts[1]), truth_area


def weighted_tables(
    kept_area: np.ndarray,
    kept_inter: np.ndarray,
    truth_area: np.ndarray,
    label_score: np.ndarray,
    label_thresholds: Sequence[float],
    min_areas: Sequence[float],
    weights: np.ndarray,
) -> np.ndarray:
    """Weighted sums of per-image Dice over every (threshold, component size, label threshold, minimum area).

    An image's class is empty when its label score is below the label threshold or its kept area is below the minimum
    area (empty scores 1 on a clean image, 0 otherwise); else it scores the Dice of its kept pixels. Images are
    processed in chunks, so memory stays ``O(T M A)`` per image of a chunk whatever ``N``.

    Args:
        kept_area, kept_inter, truth_area: from :func:`component_counts`, ``(T, M, N)``, ``(T, M, N)``, ``(N,)``.
        label_score: ``(N,)`` label score of each image in [0, 1].
        label_thresholds: ``L`` values; the class survives the gate when ``score >= threshold``.
        min_areas: ``A`` whole-mask minimum areas in pixels of the searched arrays.
        weights: ``(N, S)`` per-image weights; a column of ``1 / N`` gives the mean Dice (the metric).

    Returns:
        ``(S, T, M, L, A)`` float64.
    """
    n_t, n_m, n = kept_area.shape
    gates = np.asarray(label_thresholds, dtype=np.float64)
    areas = np.asarray(min_areas, dtype=np.float64)
    score = np.asarray(label_score, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).reshape(n, -1)
    n_l, n_a, n_s = len(gates), len(areas), weights.shape[1]
    empty = dice_from_areas(0, 0, truth_area)  # (N,)
    out = np.zeros((n_t * n_m * n_a, n_l * n_s))
    step = max(1, 2**22 // (n_t * n_m * n_a))
    for start in range(0, n, step):
        part = slice(start, start + step)
        gain = dice_from_areas(kept_inter[..., part], kept_area[..., part], truth_area[part]) - empty[part]
        kept = kept_area[:, :, None, part] >= areas[None, None, :, None]  # (T, M, A, n)
        x = np.where(kept, gain[:, :, None, :], 0.0).reshape(n_t * n_m * n_a, -1)
        gate = score[part, None] >= gates[None, :]  # (n, L)
        y = (gate[:, :, None] * weights[part, None, :]).reshape(-1, n_l * n_s)
        out += x @ y
    tables = out.reshape(n_t, n_m, n_a, n_l, n_s).transpose(4, 0, 1, 3, 2)
    return tables + (empty @ weights)[:, None, None, None, None]


def class_table(
    probs: np.ndarray, truth: np.ndarray, grid: SearchGrid | None = None, label_score: np.ndarray | None = None
) -> np.ndarray:
    """Mean Dice of one class at every cell of a grid, exactly as :func:`steelkit.postprocess.apply_postprocess` and
    the competition metric would score it.

    Args:
        probs: ``(N, H, W)`` uint8 (x 255) or float probabilities of one class.
        truth: ``(N, H, W)`` {0, 1}.
        grid: the values tried (:class:`SearchGrid` defaults when ``None``); sizes in pixels of ``probs``.
        label_score: ``(N,)`` label score in [0, 1] (a classifier's probability); ``None`` = the max pixel
            probability (:func:`steelkit.postprocess.label_scores`).

    Returns:
        ``(T, M, L, A)`` float64 mean Dice over the ``N`` images; axes as ``grid.thresholds``,
        ``grid.min_components``, ``grid.label_thresholds`` and ``grid.areas((H, W))``.
    """
    grid = grid or SearchGrid()
    score = label_scores(probs) if label_score is None else np.asarray(label_score, dtype=np.float64)
    counts = component_counts(probs, truth, grid.thresholds, grid.min_components)
    weights = np.full((len(probs), 1), 1.0 / max(len(probs), 1))
    return weighted_tables(*counts, score, grid.label_thresholds, grid.areas(probs.shape[-2:]), weights)[0]


def best_cell(table: np.ndarray, default: Sequence[int], tolerance: float = TIE_TOLERANCE) -> tuple[int, int, int, int]:
    """Index of the best ``(T, M, L, A)`` cell; cells within ``tolerance`` of the best are ties.

    Ties go to the cell nearest ``default`` (smallest sum of index distances, then fewest axes changed), then to the
    coarsest (smaller component size, area, label threshold, threshold), so a flat table keeps the defaults rather
    than an extreme value.
    """
    cand = np.argwhere(table >= table.max() - tolerance)
    dist = np.abs(cand - np.asarray(default))
    order = np.lexsort((cand[:, 0], cand[:, 2], cand[:, 3], cand[:, 1], (dist > 0).sum(1), dist.sum(1)))
    return tuple(int(v) for v in cand[order[0]])


@dataclass(frozen=True, eq=False)
class ClassResult:
    """One class of :func:`search_full`. Sizes are in pixels of the searched arrays.

    Attributes:
        threshold, min_component, label_threshold, min_area: the setting kept: the searched cell when ``accepted``,
            else the defaults.
        searched: the best cell on all images, ``{"threshold", "min_component", "label_threshold", "min_area"}``.
        dice_before: mean Dice of the class at the defaults.
        dice_searched: mean Dice at the searched cell (in-sample, so optimistic).
        dice_after: mean Dice at the kept setting.
        empty: mean Dice of the all-empty prediction (the fraction of images without the class).
        accepted: whether the searched cell is kept (also true when it is the defaults' cell).
        reason: the guard's outcome in words, e.g. ``"kept defaults: held-out gain -0.0040 (positive in 3/10 splits)"``.
        held_out_gains: ``(R,)`` per split, the mean over both directions of the held-out gain over the defaults of the
            cell chosen on the other half; empty when the guard did not run.
        axes: the table's axis values, ``{"threshold", "min_component", "label_threshold", "min_area"}`` (the grid
            plus the defaults).
        table: ``(T, M, L, A)`` mean Dice on all images.
    """

    threshold: float
    min_component: float
    label_threshold: float
    min_area: float
    searched: dict[str, float]
    dice_before: float
    dice_searched: float
    dice_after: float
    empty: float
    accepted: bool
    reason: str
    held_out_gains: tuple[float, ...]
    axes: dict[str, tuple[float, ...]]
    table: np.ndarray

    def to_dict(self, table: bool = False) -> dict[str, Any]:
        """JSON-friendly; the ``(T, M, L, A)`` table (nested lists) only when ``table``."""
        gains = list(self.held_out_gains)
        out = {
            "threshold": self.threshold,
            "min_component": self.min_component,
            "label_threshold": self.label_threshold,
            "min_area": self.min_area,
            "searched": dict(self.searched),
            "dice_before": self.dice_before,
            "dice_searched": self.dice_searched,
            "dice_after": self.dice_after,
            "empty": self.empty,
            "accepted": self.accepted,
            "reason": self.reason,
            "held_out_gain": float(np.mean(gains)) if gains else None,
            "held_out_gains": gains,
            "positive_splits": int(sum(g > TIE_TOLERANCE for g in gains)),
            "axes": {k: list(v) for k, v in self.axes.items()},
        }
        if table:
            out["table"] = self.table.tolist()
        return out


@dataclass(frozen=True, eq=False)
class FullSearch:
    """Result of :func:`search_full`.

    Attributes:
        settings: the post-processing to apply, sizes in full-resolution pixels.
        classes: one :class:`ClassResult` per class, sizes in pixels of the searched arrays.
        defaults: the settings the search started from (and falls back to).
        grid: the grid searched.
        n_images: number of out-of-fold images.
        area_scale: full-resolution pixels per searched pixel.
        guard: whether the split-half guard ran; ``repeats`` and ``seed`` its splits.
    """

    settings: PostProcess
    classes: tuple[ClassResult, ...]
    defaults: PostProcess
    grid: SearchGrid
    n_images: int
    area_scale: float
    guard: bool
    repeats: int
    seed: int

    @property
    def dice_before(self) -> float:
        """The metric at the defaults (mean over classes of the per-class mean Dice)."""
        return float(np.mean([r.dice_before for r in self.classes]))

    @property
    def dice_after(self) -> float:
        """The metric at ``settings`` (in-sample)."""
        return float(np.mean([r.dice_after for r in self.classes]))

    @property
    def all_empty(self) -> float:
        """The metric of the all-empty prediction."""
        return float(np.mean([r.empty for r in self.classes]))

    def to_dict(self, tables: bool = False) -> dict[str, Any]:
        """JSON-friendly report: settings, scores, the grid and one entry per class (tables only when ``tables``)."""
        return {
            "postprocess": self.settings.to_dict(),
            "defaults": self.defaults.to_dict(),
            "label_source": self.settings.label_source,
            "n_images": self.n_images,
            "area_scale": self.area_scale,
            "guard": self.guard,
            "repeats": self.repeats,
            "seed": self.seed,
            "dice_before": self.dice_before,
            "dice_after": self.dice_after,
            "all_empty": self.all_empty,
            "grid": self.grid.to_dict(),
            "classes": [{"class_id": c + 1, **r.to_dict(tables)} for c, r in enumerate(self.classes)],
        }


def _halves(has_defect: np.ndarray, repeats: int, rng: np.random.Generator) -> np.ndarray:
    """``(N, 2 R)`` weights of ``repeats`` random splits in halves, stratified by ``has_defect``: columns ``2 r`` and
    ``2 r + 1`` are the indicator of half A and of half B of split ``r`` divided by the half's size."""
    n = len(has_defect)
    weights = np.zeros((n, 2 * repeats))
    for r in range(repeats):
        half = np.zeros(n, dtype=bool)
        for group in (np.flatnonzero(has_defect), np.flatnonzero(~has_defect)):
            half[rng.permutation(group)[: (len(group) + int(rng.integers(2))) // 2]] = True
        weights[:, 2 * r] = half / max(half.sum(), 1)
        weights[:, 2 * r + 1] = ~half / max((~half).sum(), 1)
    return weights


def _axis(values: Sequence[float], default: float) -> tuple[float, ...]:
    """A grid axis with the default added, sorted without duplicates."""
    return tuple(sorted({*values, default}))


def search_full(
    probs: np.ndarray,
    truth: np.ndarray,
    grid: SearchGrid | None = None,
    label_probs: np.ndarray | None = None,
    defaults: PostProcess | None = None,
    area_scale: float = 1.0,
    guard: bool = True,
    repeats: int = 10,
    seed: int = 0,
    tolerance: float = TIE_TOLERANCE,
) -> FullSearch:
    """Joint exact search per class of pixel threshold, component minimum size, label gate and minimum area.

    Each class's table holds the exact mean Dice of every cell of ``grid`` (plus the defaults' values); its best cell
    (ties broken towards the defaults, see :func:`best_cell`) is the searched setting. With ``guard``, the images are
    split in halves ``repeats`` times (stratified by whether they hold the class, from a generator seeded with
    ``seed``); the cell chosen on one half is scored against the defaults on the other, both ways. The searched
    setting is kept only when that held-out gain is positive on average and in a majority of the splits; otherwise the
    class keeps its defaults. Components are labelled once per (image, threshold) whatever ``repeats``.

    Args:
        probs: ``(N, C, H, W)`` out-of-fold probabilities, uint8 (x 255) or float.
        truth: ``(N, C, H, W)`` {0, 1}.
        grid: the values tried (:class:`SearchGrid` defaults when ``None``); sizes in pixels of ``probs``.
        label_probs: ``(N, C)`` classifier probabilities in [0, 1] for the label gate (``label_source =
            "classifier"``); ``None`` gates on the max pixel probability (``"max_prob"``).
        defaults: the settings to improve on and fall back to (sizes in full-resolution pixels); ``PostProcess()``
            (0.5, no sizes, no gate) when ``None``.
        area_scale: full-resolution pixels per pixel of ``probs`` (``1 / scale ** 2``, as ``full_area_scale`` of
            :func:`search_postprocess`); the returned settings hold sizes in full-resolution pixels.
        guard: run the split-half overfit guard.
        repeats: number of random splits of the guard.
        seed: seed of the guard's ``numpy.random.Generator``.
        tolerance: mean-Dice differences up to this are ties.

    Returns:
        The settings, per-class results and a ``to_dict()`` report.

    Raises:
        ValueError: no images, shapes disagree, ``area_scale <= 0``, ``label_probs`` is not ``(N, C)`` in [0, 1], or
            the defaults gate on a label source other than the one searched.
    """
    grid = grid or SearchGrid()
    defaults = defaults or PostProcess()
    if probs.shape != truth.shape or probs.ndim != 4:
        raise ValueError(f"probs {probs.shape} and truth {truth.shape} must both be (N, C, H, W)")
    n, n_c = probs.shape[:2]
    if n == 0:
        raise ValueError("no out-of-fold images to search")
    if area_scale <= 0:
        raise ValueError(f"area_scale must be > 0, got {area_scale}")
    source = "max_prob" if label_probs is None else "classifier"
    if label_probs is not None:
        label_probs = np.asarray(label_probs, dtype=np.float64)
        if label_probs.shape != (n, n_c) or not ((label_probs >= 0) & (label_probs <= 1)).all():
            raise ValueError(f"label_probs must be ({n}, {n_c}) in [0, 1], got shape {label_probs.shape}")
    if defaults.gated and defaults.label_source != source:
        raise ValueError(f"defaults gate on {defaults.label_source!r} but the search gates on {source!r}")
    rng = np.random.default_rng(seed)
    results = []
    for c in range(n_c):
        axes = {
            "threshold": _axis(grid.thresholds, defaults.pixel_threshold[c]),
            "min_component": _axis(grid.min_components, defaults.min_component[c] / area_scale),
            "label_threshold": _axis(grid.label_thresholds, defaults.label_threshold[c]),
            "min_area": _axis(grid.areas(probs.shape[-2:]), defaults.min_area[c] / area_scale),
        }
        default = (
            axes["threshold"].index(defaults.pixel_threshold[c]),
            axes["min_component"].index(defaults.min_component[c] / area_scale),
            axes["label_threshold"].index(defaults.label_threshold[c]),
            axes["min_area"].index(defaults.min_area[c] / area_scale),
        )
        score = label_scores(probs[:, c]) if label_probs is None else label_probs[:, c]
        counts = component_counts(probs[:, c], truth[:, c], axes["threshold"], axes["min_component"])
        run_guard = guard and n >= 4  # both halves of a stratified split then hold an image
        weights = np.full((n, 1), 1.0 / max(n, 1))
        if run_guard:
            weights = np.concatenate([weights, _halves(counts[2] > 0, repeats, rng)], axis=1)
        tables = weighted_tables(*counts, score, axes["label_threshold"], axes["min_area"], weights)
        table = tables[0]
        best = best_cell(table, default, tolerance)
        gains: list[float] = []
        if best == default:
            accepted, reason = True, "the best cell is the defaults"
        elif not guard:
            accepted, reason = True, "guard off"
        elif not run_guard:
            accepted, reason = False, f"kept defaults: {n} images are too few for the guard"
        else:
            for r in range(repeats):
                half_a, half_b = tables[1 + 2 * r], tables[2 + 2 * r]
                on_b = half_b[best_cell(half_a, default, tolerance)] - half_b[default]
                on_a = half_a[best_cell(half_b, default, tolerance)] - half_a[default]
                gains.append(float(on_a + on_b) / 2)
            mean, positive = float(np.mean(gains)), sum(g > tolerance for g in gains)
            accepted = mean > tolerance and positive > repeats / 2
            words = f"held-out gain {mean:+.4f} (positive in {positive}/{repeats} splits)"
            reason = f"accepted: {words}" if accepted else f"kept defaults: {words}"
        kept = best if accepted else default
        values = {name: float(axes[name][kept[k]]) for k, name in enumerate(axes)}
        results.append(
            ClassResult(
                **values,
                searched={name: float(axes[name][best[k]]) for k, name in enumerate(axes)},
                dice_before=float(table[default]),
                dice_searched=float(table[best]),
                dice_after=float(table[kept]),
                empty=float((counts[2] == 0).mean()),
                accepted=accepted,
                reason=reason,
                held_out_gains=tuple(gains),
                axes=axes,
                table=table,
            )
        )
    same = [  # classes that keep their defaults take them as given, not converted back and forth
        (r.threshold, r.min_component, r.label_threshold, r.min_area)
        == (
            defaults.pixel_threshold[c],
            defaults.min_component[c] / area_scale,
            defaults.label_threshold[c],
            defaults.min_area[c] / area_scale,
        )
        for c, r in enumerate(results)
    ]
    settings = PostProcess(
        pixel_threshold=tuple(r.threshold for r in results),
        min_area=tuple(
            defaults.min_area[c] if same[c] else int(round(r.min_area * area_scale)) for c, r in enumerate(results)
        ),
        min_component=tuple(
            defaults.min_component[c] if same[c] else int(round(r.min_component * area_scale))
            for c, r in enumerate(results)
        ),
        label_threshold=tuple(r.label_threshold for r in results),
        label_source=source,
    )
    return FullSearch(settings, tuple(results), defaults, grid, n, area_scale, guard, repeats, seed)
