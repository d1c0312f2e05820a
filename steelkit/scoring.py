"""Score a submission file against true labels with the competition metric (pandas + numpy)."""

from __future__ import annotations

from pathlib import Path

from .constants import CLASS_ID, ENCODED, IMAGE_SHAPE
from .csvio import labels_for, read_labels, read_sample_submission, read_submission
from .metric import Score, score_pairs

__all__ = ["score_submission_file"]


def score_submission_file(submission: Path, sample: Path, labels: Path, shape=IMAGE_SHAPE) -> Score:
    """Validate ``submission`` against ``sample`` and score it against ``labels`` (any train.csv layout)."""
    sample_ = read_sample_submission(sample)
    frame = read_submission(submission, sample_, shape)
    truth = labels_for(read_labels(labels, shape), sample_.keys)
    return score_pairs(frame[ENCODED].tolist(), truth, frame[CLASS_ID].tolist(), shape)
