"""PNG figures of the threshold search (matplotlib, imported lazily; part of the ``train`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .search import ClassSearch

__all__ = ["plot_search"]


def plot_search(
    results: Sequence[ClassSearch],
    thresholds: Sequence[float],
    min_areas: Sequence[int],
    path: Path,
    area_scale: float = 1.0,
) -> Path:
    """One panel per class: mean Dice against the pixel threshold, one curve per minimum area; the chosen pair is
    marked, the all-empty Dice of the class is dashed. Areas are labelled in full-resolution pixels
    (``area * area_scale``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=False)
    for c, (ax, result) in enumerate(zip(axes, results)):
        for j, area in enumerate(min_areas):
            ax.plot(thresholds, result.table[:, j], lw=1.2, label=f"min area {round(area * area_scale)}")
        ax.axhline(result.empty, color="grey", ls="--", lw=1, label="all empty")
        chosen = f"chosen {result.threshold:.2f} / {round(result.min_area * area_scale)}"
        ax.plot([result.threshold], [result.dice], "k*", ms=12, label=chosen)
        ax.set_title(f"class {c + 1}: Dice {result.baseline:.3f} at 0.5 -> {result.dice:.3f}")
        ax.set_xlabel("pixel threshold")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice over (image, class) pairs")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
