"""From probabilities to masks: image-level label gate, pixel threshold, connected-component minimum size, whole-mask
minimum area (numpy + OpenCV, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .constants import NUM_CLASSES

__all__ = [
    "LABEL_SOURCES",
    "PostProcess",
    "apply_postprocess",
    "binarize",
    "label_components",
    "label_scores",
    "remove_small_components",
    "threshold_level",
]

#: where a class's image-level label score comes from: its max pixel probability, or a classifier given by the caller
LABEL_SOURCES = ("max_prob", "classifier")
#: per-class tuple fields of :class:`PostProcess`, in ``to_dict`` order
_TUPLE_FIELDS = ("pixel_threshold", "min_area", "min_component", "label_threshold")


@dataclass(frozen=True)
class PostProcess:
    """Per-class post-processing settings, applied in the order label gate, pixel threshold, components, area.

    Attributes:
        pixel_threshold: probability in [0, 1] above which a pixel is defect, per class.
        min_area: a class's whole mask is dropped when it has fewer pixels than this (full-resolution pixels).
        min_component: connected components smaller than this are removed first (0 = keep all).
        label_threshold: a class is dropped from an image whose label score is below this, in [0, 1] (0 = off).
        label_source: what the label score is, one of :data:`LABEL_SOURCES`: ``"max_prob"`` = the class's max pixel
            probability in the image, ``"classifier"`` = a classifier probability the caller passes.
    """

    pixel_threshold: tuple[float, ...] = (0.5,) * NUM_CLASSES
    min_area: tuple[int, ...] = (0,) * NUM_CLASSES
    min_component: tuple[int, ...] = (0,) * NUM_CLASSES
    label_threshold: tuple[float, ...] = (0.0,) * NUM_CLASSES
    label_source: str = "max_prob"

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            values = getattr(self, name)
            if len(values) != NUM_CLASSES:
                raise ValueError(f"postprocess.{name} needs {NUM_CLASSES} values, got {list(values)}")
        for name in ("pixel_threshold", "label_threshold"):
            if not all(0.0 <= t <= 1.0 for t in getattr(self, name)):
                raise ValueError(f"postprocess.{name} must lie in [0, 1], got {list(getattr(self, name))}")
        for name in ("min_area", "min_component"):
            if any(v < 0 for v in getattr(self, name)):
                raise ValueError(f"postprocess.{name} must be >= 0, got {list(getattr(self, name))}")
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"postprocess.label_source must be one of {LABEL_SOURCES}, got {self.label_source!r}")

    @property
    def gated(self) -> bool:
        """Whether any class has an active label gate (``label_threshold > 0``)."""
        return any(t > 0 for t in self.label_threshold)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PostProcess:
        """Inverse of :meth:`to_dict`; missing keys take their defaults and unknown keys are ignored."""
        kwargs: dict[str, Any] = {k: tuple(v) for k, v in values.items() if k in _TUPLE_FIELDS}
        if "label_source" in values:
            kwargs["label_source"] = str(values["label_source"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: four lists of four numbers and ``label_source``."""
        return {**{k: list(getattr(self, k)) for k in _TUPLE_FIELDS}, "label_source": self.label_source}


def binarize(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Threshold per class.

    Args:
        probs: ``(C, H, W)`` uint8 probabilities x 255 (or float in [0, 1]).
        thresholds: one probability threshold per class.

    Returns:
        ``(C, H, W)`` bool: a pixel is on when its probability is ``>= t``.
    """
    levels = [threshold_level(t, probs.dtype) for t in thresholds]
    if probs.dtype != np.uint8 or probs.ndim != 3 or not probs.flags.c_contiguous or probs.size == 0:
        return probs >= np.array(levels).reshape(-1, 1, 1)
    # OpenCV's uint8 threshold is several times faster than numpy's comparison; ``p > level - 1`` is ``p >= level``
    out = np.empty(probs.shape, dtype=np.uint8)
    for c, level in enumerate(levels):
        cv2.threshold(probs[c], level - 1, 1, cv2.THRESH_BINARY, dst=out[c])
    return out.view(bool)


def threshold_level(threshold: float, dtype: np.dtype):
    """The value a probability array of ``dtype`` is compared with (``>=``).

    For uint8 (probability x 255) it is ``ceil(t * 255)``, so that ``u8 >= level`` exactly when ``u8 / 255 >= t``.
    """
    return int(np.ceil(threshold * 255.0 - 1e-9)) if dtype == np.uint8 else threshold


def label_scores(probs: np.ndarray) -> np.ndarray:
    """The ``"max_prob"`` label score: the max pixel probability of every class in every image.

    Args:
        probs: ``(N, C, H, W)`` or ``(C, H, W)`` (any ``(..., H, W)``) uint8 (x 255) or float probabilities.

    Returns:
        ``(N, C)`` or ``(C,)`` float64 in [0, 1] (uint8 is divided by 255).
    """
    probs = np.asarray(probs)
    peak = probs.reshape(probs.shape[:-2] + (-1,)).max(axis=-1).astype(np.float64)
    return peak / 255.0 if probs.dtype == np.uint8 else peak


def label_components(pixels: np.ndarray, stats: bool = False) -> tuple:
    """8-connected components of an ``(H, W)`` uint8 image (non-zero = on), as OpenCV labels them.

    Labels are uint16 when the image cannot hold 65,536 components (at most ``ceil(H / 2) * ceil(W / 2)`` fit): OpenCV
    labels, and above all measures, several times faster with them than with int32 labels.

    Returns:
        ``(n, labels)`` or, with ``stats``, ``(n, labels, stats)``: ``n`` labels counting the background 0, ``(H, W)``
        labels and ``(n, 5)`` int32 ``cv2.CC_STAT_*`` rows.
    """
    h, w = pixels.shape
    ltype = cv2.CV_16U if ((h + 1) // 2) * ((w + 1) // 2) < 2**16 else cv2.CV_32S
    if stats:
        n, labels, table, _ = cv2.connectedComponentsWithStats(pixels, connectivity=8, ltype=ltype)
        return n, labels, table
    return cv2.connectedComponents(pixels, connectivity=8, ltype=ltype)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels from an ``(H, W)`` mask.

    Components are labelled inside the bounding box of the mask's pixels only (:func:`label_components`) and measured
    with a ``bincount`` of their labels. The mask is returned as given when no component is dropped.
    """
    if min_size <= 0 or not mask.any():
        return mask
    pixels = mask.view(np.uint8) if mask.dtype == bool else (mask.astype(np.uint8) != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(pixels)
    n, labels = label_components(np.ascontiguousarray(pixels[y : y + h, x : x + w]))
    keep = np.bincount(labels.ravel(), minlength=n) >= min_size
    keep[0] = False
    if keep[1:].all():
        return mask if mask.dtype == bool else pixels.view(bool)
    out = np.zeros(mask.shape, dtype=bool)
    out[y : y + h, x : x + w] = keep[labels]
    return out


def apply_postprocess(
    probs: np.ndarray, settings: PostProcess, area_scale: float = 1.0, label_probs: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities of one image to final masks.

    Per class, in order: the class is emptied when its label score is below ``label_threshold``; pixels
    ``>= pixel_threshold`` are on; components smaller than ``min_component`` are removed; the mask is emptied when
    fewer than ``min_area`` pixels remain.

    Args:
        probs: ``(4, H, W)`` uint8 (x 255) or float probabilities.
        settings: thresholds and areas; areas are in full-resolution pixels.
        area_scale: pixels of ``probs`` per full-resolution pixel (``scale ** 2`` when predicting at reduced size).
        label_probs: ``(4,)`` float classifier probabilities in [0, 1] of this image; required when
            ``settings.label_source == "classifier"`` and a label gate is on (ignored otherwise).

    Returns:
        ``(4, H, W)`` bool masks.

    Raises:
        ValueError: the classifier gate is on and ``label_probs`` is missing or not ``(4,)`` in [0, 1].
    """
    masks = binarize(probs, settings.pixel_threshold)
    if settings.gated:
        if settings.label_source == "classifier":
            if label_probs is None:
                raise ValueError("postprocess.label_source is 'classifier': pass label_probs, the classifier's (4,)")
            scores = np.asarray(label_probs, dtype=np.float64)
            if scores.shape != (masks.shape[0],) or not ((scores >= 0) & (scores <= 1)).all():
                raise ValueError(f"label_probs must be ({masks.shape[0]},) in [0, 1], got {scores.tolist()}")
        else:
            scores = label_scores(probs)
        masks[scores < np.asarray(settings.label_threshold)] = False
    for c in range(masks.shape[0]):
        if settings.min_component[c] > 0:
            masks[c] = remove_small_components(masks[c], settings.min_component[c] * area_scale)
        if np.count_nonzero(masks[c]) < settings.min_area[c] * area_scale:
            masks[c] = False
    return masks
