"""Competition CSVs in both layouts: train labels, sample submissions and submissions (pandas + numpy, no torch).

Layouts:

* ``old``: ``ImageId_ClassId,EncodedPixels`` with ``ImageId_ClassId = "<image>.jpg_<class>"``; 4 rows per image,
  empty ``EncodedPixels`` when the class is absent.
* ``new``: ``ImageId,ClassId,EncodedPixels`` (train.csv, defective rows only) or ``ImageId,EncodedPixels,ClassId``
  (sample_submission.csv, 4 rows per image).

Every frame returned here has the canonical columns ``ImageId`` (str), ``ClassId`` (int) and ``EncodedPixels``
(str, ``""`` for empty) plus ``row``: the 1-based line number in the file (header = line 1), for error messages.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import (
    CLASS_ID,
    CLASS_IDS,
    ENCODED,
    IMAGE_ID,
    IMAGE_SHAPE,
    NEW_SUBMISSION_COLUMNS,
    NEW_TRAIN_COLUMNS,
    OLD_COLUMNS,
    OLD_KEY,
)
from .rle import parse_runs

__all__ = [
    "Labels",
    "SampleSubmission",
    "all_empty_predictions",
    "format_rows",
    "label_statistics",
    "labels_for",
    "read_labels",
    "read_rows",
    "read_sample_submission",
    "read_submission",
    "write_csv_atomic",
    "write_submission",
]

PathLike = str | os.PathLike
#: (image id, class id) -> RLE string
Predictions = Mapping[tuple[str, int], str]


def _detect_layout(columns: Sequence[str], path: PathLike) -> str:
    cols = tuple(columns)
    if cols == OLD_COLUMNS:
        return "old"
    if set(cols) == set(NEW_TRAIN_COLUMNS) and len(cols) == 3:
        return "new"
    raise ValueError(
        f"{path}: unrecognised header {','.join(cols)!r}; expected {','.join(OLD_COLUMNS)!r}, "
        f"{','.join(NEW_TRAIN_COLUMNS)!r} or {','.join(NEW_SUBMISSION_COLUMNS)!r}"
    )


def read_rows(path: PathLike) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
    """Read any competition CSV into canonical columns.

    Returns:
        ``(frame, layout, columns)``: frame with ``ImageId, ClassId, EncodedPixels, row``; layout ``"old"`` or
        ``"new"``; the file's own column order (used to write an answer in the same layout).

    Raises:
        ValueError: unknown header, a malformed ``ImageId_ClassId`` or a class id outside 1..4, naming the
            file and the row.
    """
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    layout = _detect_layout(frame.columns, path)
    columns = tuple(frame.columns)
    rows = np.arange(len(frame)) + 2
    if layout == "old":
        parts = frame[OLD_KEY].str.rsplit("_", n=1, expand=True)
        if frame.empty:  # a header and no rows: split gives no columns
            parts = pd.DataFrame({0: pd.Series(dtype=str), 1: pd.Series(dtype=str)})
        if parts.shape[1] != 2 or parts[1].isna().any():
            bad = int(np.flatnonzero(parts[1].isna())[0]) if parts.shape[1] == 2 else 0
            raise ValueError(
                f"{path}: row {rows[bad]}: {OLD_KEY} {frame[OLD_KEY].iloc[bad]!r} is not '<image>_<class>'"
            )
        image_ids, class_text = parts[0], parts[1]
    else:
        image_ids, class_text = frame[IMAGE_ID], frame[CLASS_ID]
    class_ids = pd.to_numeric(class_text, errors="coerce")
    bad = ~class_ids.isin(CLASS_IDS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: row {rows[i]}: class id {class_text.iloc[i]!r} is not one of {list(CLASS_IDS)} "
            f"({int(bad.sum())} such rows)"
        )
    out = pd.DataFrame(
        {
            IMAGE_ID: image_ids.astype(str).to_numpy(),
            CLASS_ID: class_ids.astype(np.int64).to_numpy(),
            ENCODED: frame[ENCODED].astype(str).str.strip().to_numpy(),
            "row": rows,
        }
    )
    return out, layout, columns


def _check_rles(frame: pd.DataFrame, path: PathLike, shape: tuple[int, int], on_error: str) -> np.ndarray:
    """Validate every RLE; return a keep-mask. ``on_error="raise"`` raises on the first bad row."""
    keep = np.ones(len(frame), dtype=bool)
    for i, (image_id, class_id, rle, row) in enumerate(frame[[IMAGE_ID, CLASS_ID, ENCODED, "row"]].itertuples(False)):
        try:
            parse_runs(rle, shape, image_id, class_id)
        except ValueError as err:
            if on_error == "raise":
                raise ValueError(f"{path}: row {row}: {err}") from None
            keep[i] = False
    return keep


@dataclass(frozen=True)
class Labels:
    """Ground-truth masks of a train.csv (or of hidden test labels), in either layout.

    Attributes:
        frame: defective rows only: ``ImageId, ClassId, EncodedPixels, row``, sorted by image then class.
        image_ids: every image the file names, in first-appearance order (the old layout also names clean images;
            the new layout names defective images only).
        layout: ``"old"`` or ``"new"``.
        path: the file read.
        skipped: rows dropped by ``on_error="skip"`` (malformed RLE).
    """

    frame: pd.DataFrame
    image_ids: tuple[str, ...]
    layout: str
    path: str
    skipped: int = 0

    def as_dict(self) -> dict[tuple[str, int], str]:
        """``{(image id, class id): rle}`` for every defective pair."""
        return dict(zip(zip(self.frame[IMAGE_ID], self.frame[CLASS_ID]), self.frame[ENCODED]))

    def classes_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """``(N, 4)`` uint8 presence flags for the given images (absent images are clean)."""
        index = {image_id: i for i, image_id in enumerate(image_ids)}
        flags = np.zeros((len(image_ids), len(CLASS_IDS)), dtype=np.uint8)
        rows = self.frame[self.frame[IMAGE_ID].isin(index)]
        flags[rows[IMAGE_ID].map(index).to_numpy(), rows[CLASS_ID].to_numpy() - 1] = 1
        return flags


def read_labels(path: PathLike, shape: tuple[int, int] = IMAGE_SHAPE, on_error: str = "raise") -> Labels:
    """Read a train.csv in either layout and validate every mask.

    Args:
        path: the CSV.
        shape: ``(H, W)`` that every RLE must fit.
        on_error: ``"raise"`` (default) or ``"skip"`` malformed RLE rows (counted in ``Labels.skipped``).

    Raises:
        ValueError: naming file, row and problem: malformed RLE, duplicate (image, class) rows, bad class ids.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    frame, layout, _ = read_rows(path)
    image_ids = tuple(pd.unique(frame[IMAGE_ID]))
    duplicated = frame.duplicated([IMAGE_ID, CLASS_ID], keep="first")
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        first = frame[(frame[IMAGE_ID] == frame[IMAGE_ID].iloc[i]) & (frame[CLASS_ID] == frame[CLASS_ID].iloc[i])]
        raise ValueError(
            f"{path}: row {frame['row'].iloc[i]}: duplicate row for image {frame[IMAGE_ID].iloc[i]} class "
            f"{frame[CLASS_ID].iloc[i]} (first at row {first['row'].iloc[0]})"
        )
    frame = frame[frame[ENCODED] != ""]
    keep = _check_rles(frame, path, shape, on_error)
    skipped = int((~keep).sum())
    frame = frame[keep].sort_values([IMAGE_ID, CLASS_ID], kind="stable").reset_index(drop=True)
    return Labels(frame=frame, image_ids=image_ids, layout=layout, path=str(path), skipped=skipped)


@dataclass(frozen=True)
class SampleSubmission:
    """The rows a submission must answer, in order.

    Attributes:
        frame: ``ImageId, ClassId, EncodedPixels, row`` in file order.
        layout: ``"old"`` or ``"new"``.
        columns: the file's column order, reproduced when writing.
        path: the file read.
    """

    frame: pd.DataFrame
    layout: str
    columns: tuple[str, ...]
    path: str

    @property
    def image_ids(self) -> list[str]:
        """Unique test image ids in first-appearance order."""
        return list(pd.unique(self.frame[IMAGE_ID]))

    @property
    def keys(self) -> list[tuple[str, int]]:
        """``(image id, class id)`` of every row, in order."""
        return list(zip(self.frame[IMAGE_ID], self.frame[CLASS_ID].tolist()))


def read_sample_submission(path: PathLike) -> SampleSubmission:
    """Read a sample_submission.csv in either layout.

    Raises:
        ValueError: unknown header, bad class id, or a duplicated (image, class) row, naming the file and row.
    """
    frame, layout, columns = read_rows(path)
    duplicated = frame.duplicated([IMAGE_ID, CLASS_ID])
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ValueError(
            f"{path}: row {frame['row'].iloc[i]}: duplicate row for image {frame[IMAGE_ID].iloc[i]} "
            f"class {frame[CLASS_ID].iloc[i]}"
        )
    return SampleSubmission(frame=frame, layout=layout, columns=columns, path=str(path))


def format_rows(sample: SampleSubmission, predictions: Predictions) -> pd.DataFrame:
    """Arrange predictions in the sample submission's layout and row order (missing pairs are empty)."""
    encoded = [predictions.get(key, "") or "" for key in sample.keys]
    image_ids = sample.frame[IMAGE_ID].to_numpy()
    class_ids = sample.frame[CLASS_ID].to_numpy()
    if sample.layout == "old":
        keys = [f"{image_id}_{class_id}" for image_id, class_id in zip(image_ids, class_ids)]
        data = {OLD_KEY: keys, ENCODED: encoded}
    else:
        data = {IMAGE_ID: image_ids, CLASS_ID: class_ids, ENCODED: encoded}
    return pd.DataFrame(data)[list(sample.columns)]


def read_submission(path: PathLike, sample: SampleSubmission, shape: tuple[int, int] = IMAGE_SHAPE) -> pd.DataFrame:
    """Read a submission and check it answers ``sample``: same layout, same rows in the same order, valid RLE.

    Returns:
        The canonical frame (``ImageId, ClassId, EncodedPixels, row``).

    Raises:
        ValueError: naming the file, the first offending row and the problem.
    """
    frame, layout, columns = read_rows(path)
    if columns != sample.columns:
        raise ValueError(f"{path}: columns {list(columns)} differ from the sample submission's {list(sample.columns)}")
    if len(frame) != len(sample.frame):
        raise ValueError(f"{path}: {len(frame)} rows, the sample submission has {len(sample.frame)}")
    same = (frame[IMAGE_ID].to_numpy() == sample.frame[IMAGE_ID].to_numpy()) & (
        frame[CLASS_ID].to_numpy() == sample.frame[CLASS_ID].to_numpy()
    )
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        raise ValueError(
            f"{path}: row {i + 2} is ({frame[IMAGE_ID].iloc[i]}, {frame[CLASS_ID].iloc[i]}), the sample submission "
            f"has ({sample.frame[IMAGE_ID].iloc[i]}, {sample.frame[CLASS_ID].iloc[i]}) there"
        )
    _check_rles(frame, path, shape, "raise")
    return frame


def write_csv_atomic(frame: pd.DataFrame, path: PathLike) -> Path:
    """Write ``frame`` as CSV to a temporary file beside ``path``, then rename it over ``path``.

    A failure (disk full, read-only folder) leaves no partial file at ``path`` and raises ``OSError`` naming it.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            frame.to_csv(handle, index=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise OSError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path


def write_submission(
    sample: SampleSubmission,
    predictions: Predictions,
    path: PathLike,
    shape: tuple[int, int] = IMAGE_SHAPE,
) -> Path:
    """Validate and atomically write a submission answering ``sample``.

    Args:
        sample: the sample submission; its layout and row order are reproduced.
        predictions: ``{(image id, class id): rle}``; pairs not given are written empty.
        path: destination, e.g. ``/kaggle/working/submission.csv``.
        shape: ``(H, W)`` every RLE must fit.

    Raises:
        ValueError: a prediction names a pair the sample does not have, or an RLE is malformed (nothing written).
        OSError: the destination cannot be written (nothing left at ``path``).
    """
    wanted = set(sample.keys)
    extra = [key for key in predictions if key not in wanted]
    if extra:
        raise ValueError(f"{len(extra)} predictions name pairs not in {sample.path}, e.g. {extra[0]}")
    frame = format_rows(sample, predictions)
    canonical = sample.frame[[IMAGE_ID, CLASS_ID, "row"]].assign(**{ENCODED: frame[ENCODED].to_numpy()})
    _check_rles(canonical, f"submission for {sample.path}", shape, "raise")
    return write_csv_atomic(frame, path)


def all_empty_predictions(sample: SampleSubmission) -> dict[tuple[str, int], str]:
    """The all-empty answer: every pair empty (scores about 0.856 on the public leaderboard)."""
    return {key: "" for key in sample.keys}


def labels_for(labels: Labels | None, keys: Sequence[tuple[str, int]]) -> list[str]:
    """Truth RLE for each key (``""`` where the labels have no mask)."""
    truth = labels.as_dict() if labels is not None else {}
    return [truth.get(key, "") for key in keys]


def label_statistics(flags: np.ndarray) -> dict[str, Any]:
    """Image-level statistics of ``(N, 4)`` class-presence flags (e.g. ``Labels.classes_of(all train images)``).

    Returns:
        ``images``, ``images_per_class`` (per class id), ``defective``, ``clean``, ``images_by_class_count``
        (``{0: clean, 1: ..., 2: ..., 3: ...}``), ``empty_pair_fraction``.
    """
    flags = np.asarray(flags).astype(bool)
    per_image = flags.sum(1)
    return {
        "images": len(flags),
        "images_per_class": {c: int(n) for c, n in zip(CLASS_IDS, flags.sum(0))},
        "defective": int((per_image > 0).sum()),
        "clean": int((per_image == 0).sum()),
        "images_by_class_count": {
            k: int((per_image == k).sum()) for k in range(len(CLASS_IDS) + 1) if (per_image == k).any()
        },
        "empty_pair_fraction": float(1.0 - flags.mean()) if flags.size else 1.0,
    }
