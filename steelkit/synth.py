"""A synthetic Severstal competition: realistic labels, steel-like images and the Kaggle folder layout.

Pure numpy + OpenCV (no torch). Labels come first: each image's class combination is drawn from the real
train set's combination counts, then each class gets one mask, either procedural (filled polygons shaped
like the class's real masks) or borrowed from a real ``train.csv`` through :class:`MaskBank`. Images are
then rendered around the labels: rolled-steel texture, class-specific defect appearance, unlabelled
defect-like marks (so false positives are possible) and dark off-sheet ends that never cover a mask.

Geometry is drawn in reference pixels of the real 256x1600 image and scaled to the requested size, so tiny
non-square images (e.g. 32x200) keep the same layout. Every function takes its ``np.random.Generator``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .constants import (
    CLASS_ID,
    CLASS_IDS,
    ENCODED,
    HEIGHT,
    IMAGE_SHAPE,
    NEW_SUBMISSION_COLUMNS,
    NEW_TRAIN_COLUMNS,
    OLD_COLUMNS,
    SAMPLE_SUBMISSION_CSV,
    TEST_IMAGES,
    TEST_LABELS_CSV,
    TRAIN_CSV,
    TRAIN_IMAGES,
    WIDTH,
)
from .csvio import read_labels, write_csv_atomic
from .rle import decode, encode

__all__ = ["AREA_MODEL", "COMBINATION_COUNTS", "MaskBank", "RenderInfo", "render_image", "sample_labels", "synthesize"]

#: real class-combination counts over the 12,568 train images ("" = clean, "34" = classes 3 and 4), derived
#: from the real train.csv (``train_image_flags.csv``): 47.0% clean, 3.4% multi-class
COMBINATION_COUNTS: dict[str, int] = {
    "": 5902, "3": 4759, "1": 769, "4": 516, "34": 284, "2": 195,
    "13": 91, "12": 35, "23": 14, "123": 2, "24": 1,
}  # fmt: skip
#: per class: ``(median area %, lognormal sigma, mean shapes drawn)`` of one mask, fitted to the real masks
#: (area mean / p50 / p90 % 1.03/0.81/2.19, 0.81/0.78/1.42, 6.06/2.72/15.07, 8.52/5.92/20.81). Class 3's sigma
#: is widened from the fitted 1.29 to restore the tail lost where its large shapes overlap; more shapes are
#: drawn than the real 3.4 / 1.3 / 2.8 / 2.2 connected components because overlapping shapes merge
AREA_MODEL: dict[int, tuple[float, float, float]] = {1: (0.81, 0.69, 4.2), 2: (0.72, 0.5, 1.4),
                                                     3: (2.72, 1.35, 3.4), 4: (5.92, 0.85, 2.7)}  # fmt: skip
#: largest area % a procedural mask is drawn with (real class-3 masks: p99 43%, max 90%)
MAX_AREA_PCT = 70.0
#: fraction of images with unlabelled defect-like marks (clean and defective alike)
MARK_PROB = 0.2
#: fraction of images drawn with a dark off-sheet end (dropped when masks leave no room for it)
OFF_SHEET_PROB = 0.15

_COMBOS = [tuple(int(ch) for ch in key) for key in COMBINATION_COUNTS]
_COMBO_P = np.array(list(COMBINATION_COUNTS.values()), dtype=float) / sum(COMBINATION_COUNTS.values())
_ID_RE = re.compile(r"^[0-9a-f]{9}\.jpg$")


# ----------------------------------------------------------------------------------------------- labels
class MaskBank:
    """Real mask geometry per class, borrowed from a Severstal ``train.csv`` (old or new layout).

    RLE strings are validated on load and decoded on demand (a decoded full-size bank would need ~0.4 MB
    per mask), at the real 256x1600 and then resized with nearest-neighbour to the requested size.
    """

    def __init__(self, rles: dict[int, list[str]], height: int = HEIGHT, width: int = WIDTH, source: str = "bank"):
        for c in CLASS_IDS:
            if not rles.get(c):
                raise ValueError(f"{source}: no masks of class {c} to borrow")
        self.rles = {c: list(rles[c]) for c in CLASS_IDS}
        self.height, self.width, self.source = height, width, source

    @classmethod
    def from_csv(cls, path, height: int = HEIGHT, width: int = WIDTH) -> MaskBank:
        """Load every non-empty mask of a train.csv.

        Args:
            path: ``ImageId,ClassId,EncodedPixels`` (new) or ``ImageId_ClassId,EncodedPixels`` (old) CSV.
            height, width: default size of :meth:`sample`'s masks.

        Raises:
            ValueError: unrecognised header, a bad row or RLE, or a class without masks; names the file.
        """
        frame = read_labels(path, IMAGE_SHAPE).frame
        rles = {c: frame.loc[frame[CLASS_ID] == c, ENCODED].tolist() for c in CLASS_IDS}
        return cls(rles, height, width, source=str(path))

    def sample(
        self, class_id: int, rng: np.random.Generator, height: int | None = None, width: int | None = None
    ) -> np.ndarray:
        """One real mask of ``class_id``, chosen uniformly, as a ``(H, W)`` uint8 {0, 1} mask."""
        height, width = height or self.height, width or self.width
        rles = self.rles[class_id]
        mask = decode(rles[int(rng.integers(len(rles)))], IMAGE_SHAPE)
        if (height, width) != IMAGE_SHAPE:
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return mask


def _polygon(rng: np.random.Generator, n: int, jitter: float, aspect: float, area: float) -> np.ndarray:
    """Star-shaped polygon of ``area`` reference px, ``aspect`` = width / height, centred on 0: ``(n, 2)`` x, y."""
    theta = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * (2 * np.pi / n)
    r = np.clip(1 + jitter * rng.standard_normal(n), 0.35, 1.8)
    pts = np.stack([r * np.cos(theta) * math.sqrt(aspect), r * np.sin(theta) / math.sqrt(aspect)], 1)
    a = rng.normal(0, 0.25)
    pts = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    x, y = pts.T
    shoelace = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    pts *= math.sqrt(area / shoelace)
    extent = np.ptp(pts[:, 1])
    if extent > 0.95 * HEIGHT:  # too tall for the strip: squash, keeping the area
        f = 0.95 * HEIGHT * rng.uniform(0.75, 1.0) / extent
        pts *= (1 / f, f)
    return pts


def _band(rng: np.random.Generator, area: float, h: float, max_t: float, tilt: float) -> np.ndarray:
    """Tilted, tapered vertical quadrilateral of ``area`` reference px, height ``h``, width <= ``max_t``: ``(4, 2)``."""
    t = float(np.clip(area / h, 3.0, max_t))
    h = min(area / t, 1.1 * HEIGHT)
    taper, tilt = rng.uniform(0.55, 1.45), rng.normal(0, tilt) * h
    wt, wb = t * taper, t * (2 - taper)
    return np.array([(-wt / 2 - tilt / 2, -h / 2), (wt / 2 - tilt / 2, -h / 2), (wb / 2 + tilt / 2, h / 2),
                     (-wb / 2 + tilt / 2, h / 2)])  # fmt: skip


def _centre_y(rng: np.random.Generator, pts: np.ndarray, overhang: float) -> float:
    """Random centre row for a shape of ``pts``, letting ``overhang`` of its height cross the top or bottom."""
    half = np.ptp(pts[:, 1]) * (1 - overhang) / 2
    return HEIGHT / 2 + rng.uniform(-1, 1) * max(HEIGHT / 2 - half, 0.0)


def _component(class_id: int, rng: np.random.Generator, area: float, cx: float, cy: float) -> np.ndarray:
    """One connected shape of ``area`` reference px near the cluster centre ``(cx, cy)``: ``(n, 2)`` x, y."""
    if class_id == 1:  # small fragmented pits: compact polygons in a narrow, tall-ish cluster
        pts = _polygon(rng, int(rng.integers(4, 8)), 0.2, math.exp(rng.normal(-0.55, 0.4)), area)
        return pts + (cx + rng.normal(0, 18), cy + rng.normal(0, 80))
    if class_id == 2:  # thin near-vertical streaks, often side by side
        pts = _band(rng, area, HEIGHT * 1.1 if rng.random() < 0.25 else rng.uniform(60, 250), 30.0, 0.04)
        return pts + (cx + rng.normal(0, 15), _centre_y(rng, pts, 0.0))
    if class_id == 3 and rng.random() < 0.6 and area < 0.6 * HEIGHT**2:  # scratches and bands
        h = HEIGHT * 1.1 if rng.random() < 0.5 else rng.uniform(40, 250)
        pts = _band(rng, area, h, 0.8 * h, 0.1)
        return pts + (cx + rng.normal(0, 150), _centre_y(rng, pts, 0.0))
    rough = class_id == 4  # class 3 patches and class 4 rough blobs
    n, jitter = (int(rng.integers(8, 15)), 0.28) if rough else (int(rng.integers(4, 9)), 0.15)
    pts = _polygon(rng, n, jitter, math.exp(rng.normal(0.35 if rough else 0.0, 0.55)), area)
    return pts + (cx + rng.normal(0, 130), _centre_y(rng, pts, 0.3))


def _procedural_mask(class_id: int, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One class mask as a cluster of filled polygons, shaped like the class's real masks: ``(H, W)`` uint8.

    The mask's area % is drawn from the class's lognormal (:data:`AREA_MODEL`); area lost to overlaps and
    to the image border is topped up with up to three extra shapes.
    """
    median, sigma, mean_k = AREA_MODEL[class_id]
    target = min(median * math.exp(sigma * rng.standard_normal()), MAX_AREA_PCT) / 100
    k = int(min(rng.geometric(1 / mean_k), 12))
    cx, cy = rng.uniform(0.03, 0.97) * WIDTH, rng.uniform(0.1, 0.9) * HEIGHT
    scale = np.array([width / WIDTH, height / HEIGHT]) * 16  # fillPoly works in 1/16 px (shift=4)
    mask = np.zeros((height, width), np.uint8)
    parts = list(target * HEIGHT * WIDTH * rng.dirichlet(np.full(k, 1.5)))
    for _ in range(4):
        if class_id == 1 and rng.random() < 0.1:  # pits sometimes spread across the strip
            cx, cy = rng.uniform(0.03, 0.97) * WIDTH, rng.uniform(0.1, 0.9) * HEIGHT
        polys = [np.round(_component(class_id, rng, a, cx, cy) * scale).astype(np.int32) for a in parts]
        cv2.fillPoly(mask, polys, 1, cv2.LINE_8, shift=4)
        missing = target - cv2.countNonZero(mask) / mask.size
        if missing < 0.1 * target:
            break
        parts = [1.2 * missing * HEIGHT * WIDTH]
    if not mask.any():  # sub-pixel shapes on a tiny image: keep one pixel so the drawn class stays present
        mask[min(int(cy / HEIGHT * height), height - 1), min(int(cx / WIDTH * width), width - 1)] = 1
    return mask


def _resolve_overlaps(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Give each shared pixel to the smaller mask; drop classes left empty. Returns masks by class id."""
    taken = None
    out = {}
    for c in sorted(masks, key=lambda c: (int(masks[c].sum()), c)):
        m = masks[c] if taken is None else masks[c] & (taken == 0)
        taken = m.copy() if taken is None else taken | m
        if m.any():
            out[c] = m
    return dict(sorted(out.items()))


def _sample_one(rng: np.random.Generator, height: int, width: int, bank: MaskBank | None) -> dict[int, np.ndarray]:
    combo = _COMBOS[int(rng.choice(len(_COMBOS), p=_COMBO_P))]
    draw = (
        (lambda c: bank.sample(c, rng, height, width)) if bank else (lambda c: _procedural_mask(c, rng, height, width))
    )
    return _resolve_overlaps({c: draw(c) for c in combo})


def sample_labels(
    n: int, rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH, mask_source: MaskBank | None = None
) -> list[dict[int, np.ndarray]]:
    """Draw the labels of ``n`` images.

    Args:
        n: number of images.
        rng: the generator every draw comes from.
        height, width: mask size.
        mask_source: borrow real masks from this bank instead of drawing procedural shapes.

    Returns:
        Per image ``{class_id: (H, W) uint8 {0, 1} mask}`` of its defect classes, sorted by class id, ``{}``
        for a clean image. Masks are non-empty and never share a pixel.
    """
    return [_sample_one(rng, height, width, mask_source) for _ in range(n)]


# -------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class RenderInfo:
    """What :func:`render_image` drew besides the labelled defects (all ``(H, W)`` bool)."""

    #: pixels touched by the dark off-sheet region (its soft edge included)
    off_sheet: np.ndarray
    #: footprint of the unlabelled defect-like marks
    marks: np.ndarray
    #: number of unlabelled marks drawn
    n_marks: int


def _blur(x: np.ndarray, sx: float, sy: float | None = None) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=max(sx, 0.3), sigmaY=max(sy if sy is not None else sx, 0.3))


def _upsampled_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise of ``shape`` (H, W) from ``cells`` (rows, cols) random values, cubic-upsampled: float32."""
    small = rng.standard_normal((max(cells[0], 2), max(cells[1], 2))).astype(np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rolled-steel background: ``(H, W)`` float32 grey levels."""
    # rolling streaks: each row varies smoothly along x (blurred before upsampling so that no knot columns show)
    rows = _blur(rng.standard_normal((height, max(width // 4, 8)), dtype=np.float32), 6.0, 0.7)
    rows = cv2.resize(rows, (width, height), interpolation=cv2.INTER_LINEAR)
    img = rows * (rng.uniform(4.0, 10.0) / max(float(rows.std()), 1e-3))
    img += _upsampled_noise(rng, (height, width), (4, 12)) * rng.uniform(2.0, 7.0)  # broad shading
    bands = _blur(rng.standard_normal((1, width)).astype(np.float32), 3.0 * width / WIDTH, 0.3)
    img += bands * (rng.uniform(0.5, 1.5) / max(float(bands.std()), 1e-3))  # mild vertical banding
    fine = cv2.blur(rng.standard_normal((height, width), dtype=np.float32), (3, 1))  # grain, elongated along x
    img += fine * rng.uniform(3.0, 7.0) + rng.uniform(60, 140)
    return img


def _pits(m: np.ndarray, rng: np.random.Generator, s: float, strength: float) -> np.ndarray:
    """Dark pits with bright rims scattered over mask ``m``: additive delta, float32 like ``m``."""
    idx = np.flatnonzero(m > 0)
    dots = np.zeros(m.shape, np.float32)
    n = int(np.clip(idx.size / (45 * s * s), 1, 400))
    dots.flat[rng.choice(idx, n)] = rng.uniform(0.5, 1.5, n)
    s1 = max(0.7, 1.3 * s)
    dog = (_blur(dots, s1) - _blur(dots, 2.5 * s1)) * (2 * np.pi * s1 * s1 / (1 - 1 / 6.25))
    return -strength * (np.clip(dog, -0.6, 1.5) + 0.3 * _blur(m, s1))


def _streaks(m: np.ndarray, rng: np.random.Generator, s: float, strength: float, shift: float) -> np.ndarray:
    """Scratch texture along the main axis of mask ``m`` (bright and dark streaks) plus a mean ``shift``."""
    h, w = m.shape
    mu = cv2.moments(m, binaryImage=True)
    vertical = mu["mu02"] >= mu["mu20"]
    length = max(2, int((h if vertical else w) / (25 * s)))
    field = _upsampled_noise(rng, (h, w) if vertical else (w, h), (length, w if vertical else h))
    field = _blur(field, 0.7 * s, 0.3)
    if not vertical:
        field = np.ascontiguousarray(field.T)
    shear = float(np.clip(mu["mu11"] / max(mu["mu02"] if vertical else mu["mu20"], 1e-6), -1, 1))
    shear_m = [[1, shear, -shear * h / 2], [0, 1, 0]] if vertical else [[1, 0, 0], [shear, 1, -shear * w / 2]]
    field = cv2.warpAffine(field, np.float32(shear_m), (w, h), borderMode=cv2.BORDER_REFLECT)
    field = np.sign(field) * np.abs(field) ** 1.5
    return _blur(m, 1.2 * s) * (strength * field + shift)


def _defect(img: np.ndarray, mask: np.ndarray, class_id: int, rng: np.random.Generator, s: float) -> None:
    """Render one class mask into ``img`` in place, with a per-defect contrast from subtle to clear."""
    x, y, w, h = cv2.boundingRect(mask)
    pad = int(8 * s) + 3
    ys, xs = slice(max(y - pad, 0), y + h + pad), slice(max(x - pad, 0), x + w + pad)
    region, m = img[ys, xs], mask[ys, xs].astype(np.float32)
    k = rng.uniform(0.45, 1.0)
    if class_id == 1:
        region += _pits(m, rng, s, 55 * k)
    elif class_id == 2:
        noise = 1 + 0.3 * _upsampled_noise(rng, m.shape, (m.shape[0] // 16 + 2, 2))
        region -= 40 * k * (_blur(m, s, 2 * s) - 0.45 * _blur(m, 4 * s)) * noise
    elif class_id == 3:
        region += _streaks(m, rng, s, 30 * k, rng.choice([-1, 1]) * rng.uniform(12, 40) * k)
    else:
        shape = m.shape
        rough = _upsampled_noise(rng, shape, (int(shape[0] / (10 * s)) + 2, int(shape[1] / (10 * s)) + 2))
        rough += 0.5 * rng.standard_normal(shape, dtype=np.float32)
        region -= region * k * rng.uniform(0.4, 0.75) * _blur(m, 2.5 * s) * np.clip(1 + 0.35 * rough, 0.3, 1.7)


def _marks(
    img: np.ndarray, union: np.ndarray, rng: np.random.Generator, s: float, prob: float
) -> tuple[np.ndarray, int]:
    """Faint unlabelled pits or scratches outside every mask; returns their ``(H, W)`` bool footprint and count."""
    height, width = img.shape
    footprint = np.zeros((height, width), bool)
    if rng.random() >= prob:
        return footprint, 0
    pad = int(10 * s) + 3
    forbidden = cv2.dilate(union, np.ones((2 * pad + 1, 2 * pad + 1), np.uint8))
    n_marks = 0
    for _ in range(int(rng.integers(1, 4))):
        spot = rng.random() < 0.5
        w = int(max(3, rng.uniform(15, 45) * width / WIDTH if spot else rng.uniform(4, 12) * width / WIDTH))
        h = int(max(3, rng.uniform(20, 80) * height / HEIGHT if spot else rng.uniform(50, 220) * height / HEIGHT))
        w, h = min(w, width - 2 * pad - 1), min(h, height - 2 * pad - 1)
        if w < 1 or h < 1:
            continue
        x, y = int(rng.integers(pad, width - w - pad)), int(rng.integers(pad, height - h - pad))
        ys, xs = slice(y - pad, y + h + pad), slice(x - pad, x + w + pad)
        if forbidden[ys, xs].any():
            continue
        m = np.zeros((h + 2 * pad, w + 2 * pad), np.uint8)
        center, axes = (pad + w // 2, pad + h // 2), (max(w // 2, 1), max(h // 2, 1))
        cv2.ellipse(m, center, axes, rng.normal(0, 10), 0, 360, 1, -1)
        m = m.astype(np.float32)
        k = rng.uniform(0.1, 0.4)  # fainter than most labelled defects (0.45 to 1)
        delta = _pits(m, rng, s, 55 * k) if spot else _streaks(m, rng, s, 22 * k, rng.uniform(-15, 15) * k)
        img[ys, xs] += delta
        footprint[ys, xs] |= np.abs(delta) > 0.5
        n_marks += 1
    return footprint, n_marks


def _off_sheet(rng: np.random.Generator, union: np.ndarray, prob: float) -> np.ndarray | None:
    """Alpha ``(H, W)`` float32 of a dark region at one end with a soft, slanted edge, clear of every mask."""
    height, width = union.shape
    if rng.random() >= prob:
        return None
    cols = np.flatnonzero(union.any(0))
    extent, soft = rng.uniform(0.03, 0.35) * width, rng.uniform(2, 10) * width / WIDTH + 0.5
    slant = rng.normal(0, 0.015) * width
    for side in ["left", "right"] if rng.random() < 0.5 else ["right", "left"]:
        free = (cols[0] if side == "left" else width - 1 - cols[-1]) if cols.size else width
        edge = min(extent, free - soft - abs(slant) / 2 - 2)
        if edge >= 0.02 * width:
            break
    else:
        return None
    x = np.arange(width, dtype=np.float32)[None, :]
    edge_y = edge + slant * (np.arange(height, dtype=np.float32)[:, None] / max(height - 1, 1) - 0.5)
    alpha = np.clip(0.5 - (x - edge_y) / (2 * soft), 0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha)  # smoothstep
    return alpha if side == "left" else np.ascontiguousarray(alpha[:, ::-1])


def render_image(
    masks: dict[int, np.ndarray],
    rng: np.random.Generator,
    height: int = HEIGHT,
    width: int = WIDTH,
    *,
    mark_prob: float = MARK_PROB,
    off_sheet_prob: float = OFF_SHEET_PROB,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, RenderInfo]:
    """Render a greyscale steel image around its labels.

    Texture, off-sheet region, defects and marks each draw from their own child of ``rng``
    (``rng.spawn(4)``), so e.g. the same ``rng`` seed with and without masks gives the same background.

    Args:
        masks: ``{class_id: (H, W) uint8 {0, 1}}`` as from :func:`sample_labels`.
        rng: generator for this image (must carry a seed sequence, as ``np.random.default_rng`` does).
        height, width: image size.
        mark_prob: probability of unlabelled defect-like marks outside the masks.
        off_sheet_prob: probability of a dark off-sheet end (placed clear of every mask).
        return_info: also return a :class:`RenderInfo`.

    Returns:
        ``(H, W)`` uint8 image, or ``(image, RenderInfo)`` when ``return_info``.
    """
    tex_rng, sheet_rng, defect_rng, mark_rng = rng.spawn(4)
    s = math.sqrt(height / HEIGHT * width / WIDTH)
    img = _texture(tex_rng, height, width)
    union = np.zeros((height, width), np.uint8)
    for c in sorted(masks):
        union |= masks[c]
        _defect(img, masks[c], c, defect_rng, s)
    marks, n_marks = _marks(img, union, mark_rng, s, mark_prob)
    alpha = _off_sheet(sheet_rng, union, off_sheet_prob)
    if alpha is not None:
        dark = sheet_rng.uniform(0, 15) + 1.5 * sheet_rng.standard_normal((height, width), dtype=np.float32)
        img += alpha * (dark - img)
    out = cv2.convertScaleAbs(np.maximum(img, 0))  # rounds and saturates to uint8
    if not return_info:
        return out
    off = alpha > 0 if alpha is not None else np.zeros((height, width), bool)
    return out, RenderInfo(off_sheet=off, marks=marks & ~off, n_marks=n_marks)


# ---------------------------------------------------------------------------------------------- folders
def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Write a CSV atomically with :func:`steelkit.csvio.write_csv_atomic`."""
    write_csv_atomic(pd.DataFrame(list(rows), columns=list(header)), path)


def _new_layout_rows(labels: dict[str, dict[int, str]]) -> list[tuple[str, int, str]]:
    """``(ImageId, ClassId, EncodedPixels)`` rows of the defective masks, sorted by image id then class id."""
    return [(i, c, labels[i][c]) for i in sorted(labels) for c in sorted(labels[i])]


def _new_id(rng: np.random.Generator, used: set) -> str:
    """A fresh ``<9 lowercase hex>.jpg`` id, redrawn on the (rare) collision with ``used``."""
    while True:
        image_id = f"{int(rng.integers(16**9)):09x}.jpg"
        if image_id not in used:
            used.add(image_id)
            return image_id


def _split_stats(labels: dict[str, dict[int, str]], areas: dict[int, list[float]]) -> dict:
    n = max(len(labels), 1)
    return {
        "images": len(labels),
        "clean_fraction": sum(not v for v in labels.values()) / n,
        "multi_class_fraction": sum(len(v) > 1 for v in labels.values()) / n,
        "images_per_class": {str(c): sum(c in v for v in labels.values()) for c in CLASS_IDS},
        "mean_area_pct": {str(c): round(float(np.mean(areas[c])), 4) if areas[c] else 0.0 for c in CLASS_IDS},
        "median_area_pct": {str(c): round(float(np.median(areas[c])), 4) if areas[c] else 0.0 for c in CLASS_IDS},
    }


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm  # optional, imported only when a bar is wanted
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc)


def synthesize(
    out_dir,
    n_train: int,
    n_test: int,
    seed: int,
    height: int = HEIGHT,
    width: int = WIDTH,
    mask_source: str | None = None,
    layout: str = "new",
    labels_path: str | None = None,
    jpeg_quality: int = 90,
    progress: bool = True,
) -> dict:
    """Write a synthetic competition folder in the real Kaggle layout.

    Writes ``out_dir/{train_images,test_images}/<9 hex>.jpg`` (3 equal channels), ``out_dir/train.csv`` and
    ``out_dir/sample_submission.csv`` in ``layout`` "new" or "old", and, outside ``out_dir``, the hidden test
    labels (new train layout, defective rows only) and ``<out_dir>_synth.json`` with the summary.

    Image ``i`` of split ``k`` (0 train, 1 test) depends only on ``(seed, k, i)``: with
    ``label_seq, render_seq, id_seq = SeedSequence(seed).spawn(2)[k].spawn(n)[i].spawn(3)``, its labels are
    ``sample_labels(1, default_rng(label_seq), ...)[0]``, its image ``render_image(labels, default_rng(render_seq),
    ...)`` and its id is drawn from ``id_seq`` (redrawn on a collision). The same arguments give byte-identical
    files. Stale JPEGs of a previous run into the same folder are removed; foreign ones raise ValueError.

    Args:
        out_dir: competition folder to create or refresh.
        n_train, n_test: number of train and test images.
        seed: seed of everything.
        height, width: image size.
        mask_source: a Severstal train.csv to borrow real mask geometry from (see :class:`MaskBank`).
        layout: "new" (``ImageId,ClassId,EncodedPixels``) or "old" (``ImageId_ClassId,EncodedPixels``).
        labels_path: hidden test labels; default ``<out_dir>_test_labels.csv``. Must be outside ``out_dir``.
        jpeg_quality: OpenCV JPEG quality.
        progress: show a tqdm bar when tqdm is installed.

    Returns:
        Summary dict: arguments, per split image counts, clean / multi-class fraction, images per class,
        mean and median area % per class, ``paths`` and ``seconds``.
    """
    start = time.perf_counter()
    if layout not in ("new", "old"):
        raise ValueError(f"layout must be 'new' or 'old', got {layout!r}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"image counts must be >= 0, got n_train={n_train}, n_test={n_test}")
    out = Path(out_dir)
    labels_file = Path(labels_path) if labels_path else Path(f"{out}_{TEST_LABELS_CSV}")
    summary_file = Path(f"{out}_synth.json")
    if labels_file.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"labels_path {labels_file} must be outside out_dir {out}: Kaggle would see it")
    bank = MaskBank.from_csv(mask_source, height, width) if mask_source else None
    # image i of a split draws its labels, rendering and id from children of its own seed sequence
    plan, used, splits = {}, set(), {}
    for split_seq, (split, folder, n) in zip(
        np.random.SeedSequence(seed).spawn(2), [("train", TRAIN_IMAGES, n_train), ("test", TEST_IMAGES, n_test)]
    ):
        children = [seq.spawn(3) for seq in split_seq.spawn(n)]
        ids = [_new_id(np.random.default_rng(c[2]), used) for c in children]
        stale = {p.name for p in (out / folder).glob("*.jpg")} - set(ids)
        if stale and not (summary_file.exists() and all(_ID_RE.match(name) for name in stale)):
            raise ValueError(f"{out / folder} holds {len(stale)} JPEGs not from a synthesize run: use an empty out_dir")
        plan[split] = (out / folder, ids, children, stale)
    for split, (image_dir, ids, children, stale) in plan.items():
        image_dir.mkdir(parents=True, exist_ok=True)
        labels: dict[str, dict[int, str]] = {}
        areas: dict[int, list[float]] = {c: [] for c in CLASS_IDS}
        for image_id, (label_seq, render_seq, _) in _progress(zip(ids, children), len(ids), f"synth {split}", progress):
            masks = _sample_one(np.random.default_rng(label_seq), height, width, bank)
            grey = render_image(masks, np.random.default_rng(render_seq), height, width)
            bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            if not cv2.imwrite(str(image_dir / image_id), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]):
                raise OSError(f"cv2.imwrite failed for {image_dir / image_id}")
            labels[image_id] = {c: encode(m) for c, m in masks.items()}
            for c, m in masks.items():
                areas[c].append(100.0 * cv2.countNonZero(m) / m.size)
        for name in stale:
            (image_dir / name).unlink()
        splits[split] = (labels, areas)

    train, test = splits["train"][0], splits["test"][0]
    old, test_rows = layout == "old", [(i, c) for i in sorted(test) for c in CLASS_IDS]
    if old:
        train_rows = [(f"{i}_{c}", train[i].get(c, "")) for i in sorted(train) for c in CLASS_IDS]
        sub_rows = [(f"{i}_{c}", "1 1") for i, c in test_rows]
    else:
        train_rows, sub_rows = _new_layout_rows(train), [(i, "1 1", c) for i, c in test_rows]
    _write_csv(out / TRAIN_CSV, OLD_COLUMNS if old else NEW_TRAIN_COLUMNS, train_rows)
    _write_csv(out / SAMPLE_SUBMISSION_CSV, OLD_COLUMNS if old else NEW_SUBMISSION_COLUMNS, sub_rows)
    labels_file.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(labels_file, NEW_TRAIN_COLUMNS, _new_layout_rows(test))

    summary = {
        "seed": seed, "n_train": n_train, "n_test": n_test, "height": height, "width": width, "layout": layout,
        "mask_source": None if mask_source is None else str(mask_source), "jpeg_quality": jpeg_quality,
        "train": _split_stats(*splits["train"]), "test": _split_stats(*splits["test"]),
        "paths": {"out_dir": str(out), "train_csv": str(out / TRAIN_CSV),
                  "sample_submission": str(out / SAMPLE_SUBMISSION_CSV), "test_labels": str(labels_file),
                  "summary": str(summary_file)},
    }  # fmt: skip
    tmp = summary_file.with_name(f".{summary_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, summary_file)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
