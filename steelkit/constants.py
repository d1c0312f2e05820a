"""Competition constants: image geometry, classes and CSV column names."""

from __future__ import annotations

#: height of a Severstal image in pixels
HEIGHT = 256
#: width of a Severstal image in pixels
WIDTH = 1600
#: image shape ``(H, W)``
IMAGE_SHAPE = (HEIGHT, WIDTH)
#: number of defect classes; class ids are 1-based in every CSV
NUM_CLASSES = 4
#: class ids as they appear in the CSVs
CLASS_IDS = (1, 2, 3, 4)

#: old layout: ``ImageId_ClassId,EncodedPixels`` with ``ImageId_ClassId`` = ``"<image>.jpg_<class>"``
OLD_KEY = "ImageId_ClassId"
IMAGE_ID = "ImageId"
CLASS_ID = "ClassId"
ENCODED = "EncodedPixels"
#: column order of the old layout (train.csv and sample_submission.csv before the competition's re-release)
OLD_COLUMNS = (OLD_KEY, ENCODED)
#: column order of the new train.csv (defective rows only)
NEW_TRAIN_COLUMNS = (IMAGE_ID, CLASS_ID, ENCODED)
#: column order of the new sample_submission.csv
NEW_SUBMISSION_COLUMNS = (IMAGE_ID, ENCODED, CLASS_ID)

#: file names inside a competition folder
TRAIN_CSV = "train.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
#: hidden test labels written by the synthetic generator beside the competition folder's files
TEST_LABELS_CSV = "test_labels.csv"

#: the Kaggle competition slug
COMPETITION_SLUG = "severstal-steel-defect-detection"
#: public-leaderboard score of the all-empty submission, for reference
ALL_EMPTY_PUBLIC_LB = 0.85560
