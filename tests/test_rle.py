import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steelkit.csvio import read_rows
from steelkit.rle import decode, encode, is_canonical, parse_runs, runs_area, runs_intersection

from .conftest import shared_file

# real strings from train.csv (image 0002cc93b.jpg class 1, first runs) as golden constants
GOLDEN_PREFIX = "29102 12 29346 24 29602 24 29858 24 30114 24"


def reference_encode(mask: np.ndarray) -> str:
    """The loop-based mask2rle most public Severstal kernels used."""
    pixels = np.concatenate([[0], mask.T.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def test_column_major_one_based():
    mask = np.zeros((3, 5), dtype=np.uint8)
    mask[1, 0] = 1  # second pixel of the first column
    assert encode(mask) == "2 1"
    mask[:] = 0
    mask[0, 1] = 1  # first pixel of the second column
    assert encode(mask) == "4 1"
    assert decode("4 1", (3, 5))[0, 1] == 1 and decode("4 1", (3, 5)).sum() == 1


def test_runs_cross_columns_and_merge():
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[2:, 0] = 1
    mask[:2, 1] = 1  # continues the run of column 0 into column 1
    assert encode(mask) == "3 4"
    assert encode(np.zeros((4, 6))) == ""
    assert encode(np.ones((4, 6))) == "1 24"


def test_golden_prefix_decodes_where_kaggle_says():
    mask = decode(GOLDEN_PREFIX, (256, 1600))
    # pixel 29102 (1-based) = column 113, row 173 (0-based: 29101 = 113 * 256 + 173)
    assert mask[173, 113] == 1 and mask[172, 113] == 0
    assert mask.sum() == 12 + 24 * 4


@pytest.mark.parametrize(
    "rle, problem",
    [
        ("1 2 3", "odd number of tokens"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
        ("0 3", "1-based"),
        ("5 0", "length"),
        ("5 -2", "length"),
        ("380 2", "past the image"),
        ("10 5 1 2", "unsorted"),
        ("10 5 12 2", "overlaps"),
    ],
)
def test_malformed_rle_names_image_class_and_problem(rle, problem):
    with pytest.raises(ValueError, match=problem) as err:
        decode(rle, (19, 20), image_id="abc.jpg", class_id=3)
    assert "abc.jpg" in str(err.value) and "class 3" in str(err.value)


def test_touching_runs_are_valid_but_not_canonical():
    assert decode("1 2 3 2", (4, 5)).sum() == 4
    assert not is_canonical("1 2 3 2", (4, 5))
    assert is_canonical("1 4", (4, 5))


@pytest.mark.parametrize(
    "name", ["train_real_partial.csv", "train_real_head.csv", "public_test_predictions_khornlund.csv"]
)
def test_every_real_rle_round_trips_and_classes_never_overlap(name):
    frame, _, _ = read_rows(shared_file(name))
    frame = frame[frame["EncodedPixels"] != ""]
    assert len(frame) > 0
    for image_id, group in frame.groupby("ImageId"):
        union = np.zeros((256, 1600), dtype=np.int32)
        for class_id, rle in zip(group["ClassId"], group["EncodedPixels"]):
            mask = decode(rle, (256, 1600), image_id, class_id)
            assert encode(mask) == rle, (image_id, class_id)
            union += mask
        assert union.max() <= 1, f"{image_id}: a pixel in two classes"


def test_real_rle_matches_reference_encoder():
    frame, _, _ = read_rows(shared_file("train_real_head.csv"))
    for rle in frame["EncodedPixels"]:
        assert reference_encode(decode(rle)) == rle


shapes = st.tuples(st.integers(1, 40), st.integers(1, 70)).filter(lambda s: s[0] != s[1])


@settings(max_examples=150, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.integers(0, 1))))
def test_property_round_trip_non_square(mask):
    rle = encode(mask)
    assert rle == reference_encode(mask)
    np.testing.assert_array_equal(decode(rle, mask.shape), mask)
    assert is_canonical(rle, mask.shape)
    starts, ends = parse_runs(rle, mask.shape)
    assert runs_area(starts, ends) == mask.sum()


@settings(max_examples=100, deadline=None)
@given(shapes, st.lists(st.tuples(st.integers(0, 39), st.integers(0, 69)), max_size=40))
def test_property_sparse_masks_round_trip(shape, pixels):
    """Masks under 1/8 full take decode's scatter path; the dense tests above take the run-edge path."""
    mask = np.zeros(shape, dtype=np.uint8)
    for r, c in pixels:
        mask[r % shape[0], c % shape[1]] = 1
    rle = encode(mask)
    assert rle == reference_encode(mask)
    decoded = decode(rle, mask.shape)
    assert decoded.flags.c_contiguous and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


@settings(max_examples=100, deadline=None)
@given(shapes.flatmap(lambda s: st.tuples(*[arrays(np.uint8, s, elements=st.integers(0, 1))] * 2)))
def test_property_runs_intersection_equals_pixel_count(pair):
    a, b = pair
    ra, rb = parse_runs(encode(a), a.shape), parse_runs(encode(b), b.shape)
    assert runs_intersection(ra, rb) == int((a & b).sum())
