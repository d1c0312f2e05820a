"""From probabilities to masks: pixel threshold, connected-component minimum size, whole-mask minimum area
(numpy + OpenCV, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .constants import NUM_CLASSES

__all__ = ["PostProcess", "apply_postprocess", "binarize", "remove_small_components", "threshold_level"]


@dataclass(frozen=True)
class PostProcess:
    """Per-class post-processing settings.

    Attributes:
        pixel_threshold: probability in [0, 1] above which a pixel is defect, per class.
        min_area: a class's whole mask is dropped when it has fewer pixels than this (full-resolution pixels).
        min_component: connected components smaller than this are removed first (0 = keep all).
    """

    pixel_threshold: tuple[float, ...] = (0.5,) * NUM_CLASSES
    min_area: tuple[int, ...] = (0,) * NUM_CLASSES
    min_component: tuple[int, ...] = (0,) * NUM_CLASSES

    def __post_init__(self) -> None:
        for name in ("pixel_threshold", "min_area", "min_component"):
            values = getattr(self, name)
            if len(values) != NUM_CLASSES:
                raise ValueError(f"postprocess.{name} needs {NUM_CLASSES} values, got {list(values)}")
        if not all(0.0 <= t <= 1.0 for t in self.pixel_threshold):
            raise ValueError(f"postprocess.pixel_threshold must lie in [0, 1], got {list(self.pixel_threshold)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PostProcess:
        return cls(**{k: tuple(v) for k, v in values.items() if k in ("pixel_threshold", "min_area", "min_component")})

    def to_dict(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("pixel_threshold", "min_area", "min_component")}


def binarize(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Threshold per class.

    Args:
        probs: ``(C, H, W)`` uint8 probabilities x 255 (or float in [0, 1]).
        thresholds: one probability threshold per class.

    Returns:
        ``(C, H, W)`` bool: a pixel is on when its probability is ``>= t``.
    """
    levels = np.array([threshold_level(t, probs.dtype) for t in thresholds])
    return probs >= levels.reshape(-1, 1, 1)


def threshold_level(threshold: float, dtype: np.dtype):
    """The value a probability array of ``dtype`` is compared with (``>=``).

    For uint8 (probability x 255) it is ``ceil(t * 255)``, so that ``u8 >= level`` exactly when ``u8 / 255 >= t``.
    """
    return int(np.ceil(threshold * 255.0 - 1e-9)) if dtype == np.uint8 else threshold


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels from an ``(H, W)`` mask."""
    if min_size <= 0 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False
    return keep[labels]


def apply_postprocess(probs: np.ndarray, settings: PostProcess, area_scale: float = 1.0) -> np.ndarray:
    """Probabilities of one image to final masks.

    Args:
        probs: ``(4, H, W)`` uint8 (x 255) or float probabilities.
        settings: thresholds and areas; areas are in full-resolution pixels.
        area_scale: pixels of ``probs`` per full-resolution pixel (``scale ** 2`` when predicting at reduced size).

    Returns:
        ``(4, H, W)`` bool masks.
    """
    masks = binarize(probs, settings.pixel_threshold)
    for c in range(masks.shape[0]):
        if settings.min_component[c] > 0:
            masks[c] = remove_small_components(masks[c], settings.min_component[c] * area_scale)
        if masks[c].sum() < settings.min_area[c] * area_scale:
            masks[c] = False
    return masks
