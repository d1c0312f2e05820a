"""PNG figures for the kernel's report: search curves, mask overlays and the stage timeline.

matplotlib is imported lazily with the Agg backend (no display on Kaggle); overlays are drawn with OpenCV. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..constants import NUM_CLASSES

__all__ = [
    "CLASS_COLOURS",
    "ClassCurves",
    "overlay_masks",
    "plot_curves",
    "plot_stage_timeline",
    "write_overlays",
]

#: BGR contour colour of each class, index 0 = class 1: red, yellow, green, blue
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = ((0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 0, 0))
#: BGR colour of the true masks' contours
TRUTH_COLOUR = (255, 255, 255)
#: colour of each stage outcome's bar in the timeline (matplotlib names)
_OUTCOME_COLOURS = {"done": "tab:green", "stopped at deadline": "tab:orange", "dropped": "lightgrey"}


@dataclass(frozen=True)
class ClassCurves:
    """One class's post-processing search, for :func:`plot_curves`.

    Attributes:
        table: ``(T, M, L, A)`` mean OOF Dice of every combination: pixel thresholds x minimum component sizes x
            label thresholds x minimum areas.
        thresholds: ``(T,)`` pixel thresholds in [0, 1].
        min_components: ``(M,)`` minimum component sizes, in pixels of the searched arrays.
        label_thresholds: ``(L,)`` label-gate thresholds in [0, 1].
        min_areas: ``(A,)`` minimum mask areas, in pixels of the searched arrays.
        chosen: ``(t, m, l, a)`` indices of the chosen combination.
        default: ``(t, m, l, a)`` indices of the default settings, or ``None`` when they were not searched.
        empty_dice: mean Dice of the all-empty prediction of this class.
        area_scale: factor from searched pixels to full-resolution pixels, for the axis labels.
    """

    table: np.ndarray
    thresholds: Sequence[float]
    min_components: Sequence[int]
    label_thresholds: Sequence[float]
    min_areas: Sequence[int]
    chosen: tuple[int, int, int, int]
    default: tuple[int, int, int, int] | None = None
    empty_dice: float = 0.0
    area_scale: float = 1.0

    def __post_init__(self) -> None:
        table = np.asarray(self.table, dtype=np.float64)
        object.__setattr__(self, "table", table)
        axes = (self.thresholds, self.min_components, self.label_thresholds, self.min_areas)
        shape = tuple(len(a) for a in axes)
        if table.shape != shape:
            raise ValueError(f"table shape {table.shape} does not match the axes' lengths (T, M, L, A) = {shape}")
        for name in ("chosen", "default"):
            index = getattr(self, name)
            if index is None:
                continue
            if len(index) != 4 or not all(0 <= i < n for i, n in zip(index, shape)):
                raise ValueError(f"{name} index {index} is out of the table's shape {shape}")
            object.__setattr__(self, name, tuple(int(i) for i in index))

    @property
    def chosen_dice(self) -> float:
        """Mean Dice at the chosen combination."""
        return float(self.table[self.chosen])

    def best_along(self, axis: int) -> np.ndarray:
        """Mean Dice along ``axis`` (0 = T, 1 = M, 2 = L, 3 = A), best over the other searched dimensions."""
        others = tuple(i for i in range(4) if i != axis)
        return self.table.max(axis=others)

    def through(self, index: tuple[int, int, int, int], axis: int) -> np.ndarray:
        """Mean Dice along ``axis`` with the other dimensions held at ``index``."""
        slicer: list[Any] = list(index)
        slicer[axis] = slice(None)
        return self.table[tuple(slicer)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, x: np.ndarray, curves: ClassCurves, axis: int, label: str, xlabel: str) -> None:
    """One Dice curve along ``axis`` (best over the others), the slice through the chosen point, and both marks."""
    ax.plot(x, curves.best_along(axis), "-o", ms=3, lw=1.4, label=f"best over others ({label})")
    ax.plot(x, curves.through(curves.chosen, axis), ":", lw=1, color="tab:blue", label="others at chosen")
    ax.plot([x[curves.chosen[axis]]], [curves.chosen_dice], "k*", ms=11, label="chosen")
    if curves.default is not None:
        ax.plot([x[curves.default[axis]]], [curves.table[curves.default]], "rs", ms=6, mfc="none", label="default")
    ax.set_xlabel(xlabel)


def plot_curves(curves: Mapping[str, ClassCurves], path: Path) -> Path:
    """Per class, three panels of mean OOF Dice: against the pixel threshold, the label threshold, and the minimum
    sizes (minimum area and minimum component on one axis, full-resolution pixels), each best over the other searched
    dimensions. The chosen values are starred, the defaults boxed, the all-empty Dice dashed.

    Args:
        curves: row title (e.g. ``"class 1"``) -> its :class:`ClassCurves`, one figure row each.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    if not curves:
        raise ValueError("plot_curves needs at least one class")
    plt = _pyplot()
    rows = len(curves)
    fig, axes = plt.subplots(rows, 3, figsize=(13.5, 3.2 * rows), squeeze=False)
    for row, (title, c) in zip(axes, curves.items()):
        _panel(row[0], np.asarray(c.thresholds, float), c, 0, "threshold", "pixel threshold")
        _panel(row[1], np.asarray(c.label_thresholds, float), c, 2, "label", "label threshold (0 = off)")
        areas = np.asarray(c.min_areas, float) * c.area_scale
        components = np.asarray(c.min_components, float) * c.area_scale
        _panel(row[2], areas, c, 3, "min area", "minimum size, full-resolution pixels")
        row[2].plot(components, c.best_along(1), "-^", ms=3, lw=1.2, color="tab:purple", label="min component")
        if max(areas.max(initial=0), components.max(initial=0)) > 10:
            row[2].set_xscale("symlog", linthresh=10)
        chosen = (
            f"t {c.thresholds[c.chosen[0]]:.2f}, comp {round(c.min_components[c.chosen[1]] * c.area_scale)}, "
            f"label {c.label_thresholds[c.chosen[2]]:.2f}, area {round(c.min_areas[c.chosen[3]] * c.area_scale)}"
        )
        row[0].set_ylabel(f"{title}\nmean Dice")
        row[1].set_title(f"{title}: Dice {c.chosen_dice:.4f} at {chosen}", fontsize=9)
        for ax in row:
            ax.axhline(c.empty_dice, color="grey", ls="--", lw=1, label="all empty")
            ax.grid(alpha=0.3)
        row[2].legend(fontsize=6, loc="lower right")
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def overlay_masks(image: np.ndarray, masks: np.ndarray, truth: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """Draw predicted masks (thick contours in :data:`CLASS_COLOURS`) and true masks (thin white) on an image.

    Args:
        image: ``(H, W)`` uint8 grey (or ``(H, W, 3)`` uint8 BGR).
        masks: ``(C, H, W)`` bool predictions, class 1 first.
        truth: ``(C, H, W)`` bool true masks, or ``None``.
        title: text written in the top-left corner on a dark box; ``""`` = none.

    Returns:
        ``(H, W, 3)`` uint8 BGR; the input is not modified.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 3:
        canvas = image.copy()
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got {image.shape}")
    shape = canvas.shape[:2]
    layers = [(masks, None, max(2, round(shape[0] / 100)))]
    if truth is not None:
        layers.append((truth, TRUTH_COLOUR, 1))
    for stack, colour, thickness in layers:
        stack = np.asarray(stack)
        if stack.ndim != 3 or stack.shape[1:] != shape or stack.shape[0] > NUM_CLASSES:
            raise ValueError(f"masks must be (C <= {NUM_CLASSES}, {shape[0]}, {shape[1]}), got {stack.shape}")
        for c, mask in enumerate(stack):
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour or CLASS_COLOURS[c], thickness)
    if title:
        scale = max(0.35, shape[0] / 400)
        weight = max(1, round(scale * 2))
        (w, h), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, weight)
        cv2.rectangle(canvas, (0, 0), (w + 8, h + base + 8), (0, 0, 0), cv2.FILLED)
        cv2.putText(canvas, title, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), weight, cv2.LINE_AA)
    return canvas


def write_overlays(tiles: Sequence[np.ndarray], path: Path) -> Path | None:
    """Stack ``(H_i, W_i, 3)`` uint8 BGR tiles top to bottom (narrower ones padded black on the right) into one PNG.

    Returns:
        ``path``, or ``None`` (and no file) when there are no tiles.
    """
    if len(tiles) == 0:
        return None
    width = max(t.shape[1] for t in tiles)
    padded = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.concatenate(padded, axis=0)):
        raise OSError(f"could not write {path}")
    return path


def plot_stage_timeline(stage_logs: Sequence[Any], budget_s: float, path: Path) -> Path:
    """Gantt chart of the kernel's stages: per stage a thin bar of the estimate and a thick bar of the actual time
    (coloured by outcome: done, stopped at deadline, failed, dropped), on one time axis with the budget as a line.

    Args:
        stage_logs: :class:`~steelkit.kernel.plan.StageLog` objects or their ``to_dict()`` mappings, in run order.
        budget_s: the kernel's time limit in seconds.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    logs = [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in stage_logs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11.5, 1.2 + 0.55 * max(len(logs), 1)))
    ends = [budget_s]
    for y, log in enumerate(logs):
        estimated = float(log.get("estimated_s") or 0.0)
        actual = max(float(log.get("actual_s") or 0.0), 0.0)
        start = float(log.get("start_s") or 0.0)
        outcome = str(log.get("outcome", ""))
        colour = _OUTCOME_COLOURS.get(outcome, "tab:red" if outcome.startswith("failed") else "tab:blue")
        ax.barh(y - 0.22, estimated, left=start, height=0.25, color="tab:blue", alpha=0.35)
        ax.barh(y + 0.1, actual, left=start, height=0.4, color=colour)
        end = start + max(estimated, actual)
        ax.text(end, y, f" {outcome}: est {estimated:.0f} s, actual {actual:.0f} s", va="center", fontsize=7)
        ends.append(end)
    from matplotlib.patches import Patch

    budget_line = ax.axvline(budget_s, color="tab:red", ls="--", lw=1.2, label=f"budget {budget_s:.0f} s")
    handles = [budget_line, Patch(color="tab:blue", alpha=0.35, label="estimated")]
    for outcome, colour in (*_OUTCOME_COLOURS.items(), ("failed", "tab:red")):
        handles.append(Patch(color=colour, label=f"actual: {outcome}"))
    ax.set_yticks(range(len(logs)), [str(log.get("name", "")) for log in logs])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the kernel's start")
    ax.set_xlim(0, max(ends) * 1.35)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
