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

    Reads the mask in its own row-major order, eight columns per 64-bit word, so no column-major copy is made: a run
    starts or ends where a pixel differs from the one above it (found word by word, then byte by byte in the few
    words that differ) or, at the top of a column, from the bottom pixel of the column before.

    Args:
        mask: ``(H, W)`` array, non-zero = defect.

    Returns:
        ``"start length start length ..."`` with 1-based, column-major starts; ``""`` for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D (H, W) mask, got shape {mask.shape}")
    if mask.size == 0:
        return ""
    changes = _changes(_as_bytes(mask))  # alternating run starts and ends (0-based, column-major)
    if changes.size == 0:
        return ""
    runs = changes.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]
    runs[:, 0] += 1
    return ("%d " * runs.size % tuple(runs.ravel().tolist()))[:-1]  # faster than joining str() of each


def _as_bytes(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` mask to a C-contiguous uint8 {0, 1} array whose width is a multiple of 8 (zero columns added on the
    right, which come after every pixel in column-major order and so change no run)."""
    flags = np.asarray(mask)
    if flags.dtype != np.bool_:
        flags = flags.astype(bool)
    height, width = flags.shape
    if width % 8:
        padded = np.zeros((height, width + 8 - width % 8), dtype=bool)
        padded[:, :width] = flags
        flags = padded
    return np.ascontiguousarray(flags).view(np.uint8)


def _changes(pixels: np.ndarray) -> np.ndarray:
    """Sorted 0-based column-major offsets where a pixel differs from the previous one (the pixel before the first and
    after the last count as 0), from :func:`_as_bytes` output: ``(K,)`` int64, K even."""
    height, width = pixels.shape
    words = pixels.view(np.uint64)  # (H, W / 8): 8 columns of a row per word
    below, above = words[1:].ravel(), words[:-1].ravel()
    hit = np.flatnonzero(below != above)  # words holding a column whose pixel differs from the one above
    diff = (below[hit] ^ above[hit]).view(np.uint8)  # byte k of a word = column 8 * word + k (memory order)
    byte = np.flatnonzero(diff)
    word = hit[byte >> 3]
    rows = word // words.shape[1] + 1
    cols = (word % words.shape[1]) * 8 + (byte & 7)
    # top of a column against the bottom of the previous one; the last column's bottom against the end (padding
    # columns are all zero, so an unpadded mask needs its end checked)
    top = np.flatnonzero(pixels[0, 1:] != pixels[-1, :-1]) + 1
    edges = [cols * height + rows, top * height]
    if pixels[0, 0]:
        edges.append(np.zeros(1, dtype=np.int64))
    if pixels[-1, -1]:
        edges.append(np.full(1, height * width, dtype=np.int64))
    changes = np.concatenate(edges)
    changes.sort()
    return changes


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
    values = _fast_values(rle)
    if values is None:
        tokens = rle.split()
        if not tokens:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        if len(tokens) % 2:
            raise ValueError(f"{_where(image_id, class_id)}RLE has an odd number of tokens ({len(tokens)})")
        bad = next((t for t in tokens if not (t.isascii() and t.lstrip("-+").isdigit())), None)
        if bad is not None:
            raise ValueError(f"{_where(image_id, class_id)}RLE token {bad!r} is not an integer")
        try:
            values = np.array(tokens, dtype=np.int64)
        except OverflowError:
            bad = max(tokens, key=len)
            raise ValueError(f"{_where(image_id, class_id)}RLE token {bad!r} is out of range") from None
    elif values.size % 2:
        raise ValueError(f"{_where(image_id, class_id)}RLE has an odd number of tokens ({values.size})")
    starts = values[0::2] - 1
    lengths = values[1::2]
    ends = starts + lengths
    n_pixels = shape[0] * shape[1]
    if starts.size and (
        starts[0] >= 0 and lengths.min() >= 1 and ends[-1] <= n_pixels and (starts[1:] >= ends[:-1]).all()
    ):
        return starts, ends  # valid: sorted, disjoint, positive runs from the first start to the last end
    if (starts < 0).any():
        i = int(np.argmax(starts < 0))
        raise ValueError(f"{_where(image_id, class_id)}RLE run {i} starts at {starts[i] + 1}; starts are 1-based")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise ValueError(f"{_where(image_id, class_id)}RLE run {i} has length {lengths[i]}; lengths must be >= 1")
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
    out = np.zeros(shape, dtype=np.uint8)
    if starts.size == 0:
        return out
    # the columns the runs touch, written column by column (C-order (columns, H)) by one np.repeat of 0/1 over the
    # gaps and runs
    first, last = int(starts[0]) // height, (int(ends[-1]) - 1) // height + 1
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0] = starts[0] - first * height
    np.subtract(starts[1:], ends[:-1], out=counts[2:-1:2])
    counts[1::2] = ends - starts
    counts[-1] = last * height - ends[-1]
    columns = np.repeat(_ZERO_ONE[np.arange(counts.size) & 1], counts).reshape(last - first, height)
    # transposed through bits: pack 8 rows of a column per byte, transpose the 8x smaller array, unpack every byte into
    # 8 rows with shifts (a direct uint8 transpose is several times slower)
    bits = np.ascontiguousarray(np.packbits(columns, axis=1).T)  # (ceil(H / 8), columns)
    rows = np.right_shift(bits[:, None, :], _SHIFTS)  # (ceil(H / 8), 8, columns): bit 7 - k of each byte in row k
    rows &= 1
    out[:, first:last] = rows.reshape(-1, last - first)[:height]
    return out


#: the two values np.repeat expands in decode: gaps are 0, runs are 1
_ZERO_ONE = np.array([0, 1], dtype=np.uint8)
#: shifts that bring the bit of row k of a packed byte (np.packbits: first row in the top bit) to bit 0
_SHIFTS = np.arange(7, -1, -1, dtype=np.uint8)[:, None]


def _fast_values(rle) -> np.ndarray | None:
    """The integers of an RLE made only of ASCII digits and spaces with tokens under 10**18, parsed in one call.

    ``None`` for anything else (empty, other whitespace, signs, huge or non-integer tokens): :func:`parse_runs` then
    parses it token by token and names the problem.
    """
    if not isinstance(rle, str) or not rle.isascii() or not rle.replace(" ", "").isdigit():
        return None
    values = np.fromstring(rle, dtype=np.int64, sep=" ")
    return values if values.max() < 10**18 else None


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
