"""Run-length encoding exactly as Kaggle's Severstal competition uses it (numpy only).

Pixels are numbered 1-based in column-major order: down the first column (top to bottom), then the next
column to the right. A mask is encoded as space-separated ``start length`` pairs; the canonical encoding has
sorted, non-touching runs and is the empty string for an empty mask.
"""

from __future__ import annotations

import numpy as np

from .constants import IMAGE_SHAPE

__all__ = ["decode", "encode", "is_canonical", "parse_runs", "runs_area", "runs_intersection"]


def _where(image_id: str | None, class_id: int | None) -> str:
    parts = []
    if image_id is not None:
        parts.append(f"image {image_id}")
    if class_id is not None:
        parts.append(f"class {class_id}")
    return (", ".join(parts) + ": ") if parts else ""


def encode(mask: np.ndarray) -> str:
    """Encode a binary mask to its canonical RLE string.

    Args:
        mask: ``(H, W)`` array, non-zero = defect.

    Returns:
        ``"start length start length ..."`` with 1-based, column-major starts; ``""`` for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D (H, W) mask, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    padded = np.zeros(flat.size + 2, dtype=np.int8)
    padded[1:-1] = flat
    changes = np.flatnonzero(padded[1:] != padded[:-1])  # alternating run starts and ends (0-based)
    if changes.size == 0:
        return ""
    runs = changes.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]
    runs[:, 0] += 1
    return " ".join(map(str, runs.ravel().tolist()))


def parse_runs(
    rle: str,
    shape: tuple[int, int] = IMAGE_SHAPE,
    image_id: str | None = None,
    class_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate an RLE string into 0-based run starts and (exclusive) ends.

    Args:
        rle: the encoded string; ``""``, ``None`` or NaN mean an empty mask.
        shape: ``(H, W)`` of the image the runs index into.
        image_id, class_id: named in the error message.

    Returns:
        ``(starts, ends)``: int64 arrays of 0-based column-major pixel offsets, sorted, non-overlapping.

    Raises:
        ValueError: odd token count, a non-integer token, start < 1, length < 1, a run past the image,
            or unsorted / overlapping runs. The message names the image, class and problem.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        rle = ""
    if not isinstance(rle, str):
        raise ValueError(f"{_where(image_id, class_id)}RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if len(tokens) % 2:
        raise ValueError(f"{_where(image_id, class_id)}RLE has an odd number of tokens ({len(tokens)})")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not t.lstrip("-+").isdigit())
        raise ValueError(f"{_where(image_id, class_id)}RLE token {bad!r} is not an integer") from None
    starts = values[0::2] - 1
    lengths = values[1::2]
    n_pixels = shape[0] * shape[1]
    if (starts < 0).any():
        i = int(np.argmax(starts < 0))
        raise ValueError(f"{_where(image_id, class_id)}RLE run {i} starts at {starts[i] + 1}; starts are 1-based")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise ValueError(f"{_where(image_id, class_id)}RLE run {i} has length {lengths[i]}; lengths must be >= 1")
    ends = starts + lengths
    if (ends > n_pixels).any():
        i = int(np.argmax(ends > n_pixels))
        raise ValueError(
            f"{_where(image_id, class_id)}RLE run {i} ({starts[i] + 1} {lengths[i]}) runs past the image "
            f"of {shape[0]}x{shape[1]} = {n_pixels} pixels"
        )
    if starts.size > 1:
        bad = starts[1:] < ends[:-1]
        if bad.any():
            i = int(np.argmax(bad)) + 1
            problem = "is unsorted" if starts[i] < starts[i - 1] else "overlaps the previous run"
            raise ValueError(f"{_where(image_id, class_id)}RLE run {i} (start {starts[i] + 1}) {problem}")
    return starts, ends


def decode(
    rle: str,
    shape: tuple[int, int] = IMAGE_SHAPE,
    image_id: str | None = None,
    class_id: int | None = None,
) -> np.ndarray:
    """Decode an RLE string to a mask.

    Args:
        rle: the encoded string (see :func:`parse_runs` for what is accepted).
        shape: ``(H, W)`` of the mask.
        image_id, class_id: named in error messages.

    Returns:
        ``(H, W)`` uint8 mask with values in {0, 1}.
    """
    starts, ends = parse_runs(rle, shape, image_id, class_id)
    height, width = shape
    lengths = ends - starts
    total = int(lengths.sum())
    if total * 8 < height * width:
        # sparse (most real masks): scatter the covered pixels straight into row-major order
        out = np.zeros(shape, dtype=np.uint8)
        if total:
            index = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
            out.ravel()[(index % height) * width + index // height] = 1
        return out
    # dense: mark run edges in column-major order, integrate, transpose once
    delta = np.zeros(height * width + 1, dtype=np.int8)
    # runs are sorted and disjoint, so each start and each end index is unique within its array
    delta[starts] += 1
    delta[ends] -= 1
    flat = np.cumsum(delta[:-1], dtype=np.int8).astype(np.uint8)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def runs_area(starts: np.ndarray, ends: np.ndarray) -> int:
    """Number of pixels covered by parsed runs."""
    return int((ends - starts).sum())


def runs_intersection(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Pixels shared by two sets of parsed runs, without decoding either mask.

    Uses ``|A & B| = |A| + |B| - |A | B|``; the union of the two sorted, internally disjoint run lists is
    measured with a running maximum of run ends.
    """
    if a[0].size == 0 or b[0].size == 0:
        return 0
    starts = np.concatenate([a[0], b[0]])
    ends = np.concatenate([a[1], b[1]])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    previous = np.concatenate([[starts[0]], reach[:-1]])
    union = np.maximum(0, reach - np.maximum(starts, previous)).sum()
    return int(runs_area(*a) + runs_area(*b) - union)


def is_canonical(rle: str, shape: tuple[int, int] = IMAGE_SHAPE) -> bool:
    """True when ``rle`` is valid and equals :func:`encode` of its own decoding (sorted, merged runs)."""
    starts, ends = parse_runs(rle, shape)
    if starts.size == 0:
        return rle == ""
    return bool((starts[1:] > ends[:-1]).all()) and rle == " ".join(
        map(str, np.column_stack([starts + 1, ends - starts]).ravel().tolist())
    )
