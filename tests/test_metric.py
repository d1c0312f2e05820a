import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steelkit.metric import dice_from_areas, dice_masks, dice_rles, score_pairs
from steelkit.rle import encode

SHAPE = (6, 11)


def mask_with(pixels):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    for r, c in pixels:
        mask[r, c] = 1
    return mask


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ([], [], 1.0),  # empty prediction for empty truth scores 1
        ([(0, 0)], [], 0.0),  # any false positive on a clean pair scores 0
        ([], [(0, 0)], 0.0),
        ([(0, 0)], [(0, 0)], 1.0),
        ([(0, 0), (1, 0)], [(0, 0)], 2 * 1 / 3),
        ([(0, 0), (5, 10)], [(5, 10), (4, 10), (3, 3)], 2 * 1 / 5),
    ],
)
def test_dice_hand_values(pred, truth, expected):
    p, t = mask_with(pred), mask_with(truth)
    assert dice_masks(p[None], t[None])[0] == pytest.approx(expected)
    assert dice_rles(encode(p), encode(t), SHAPE) == pytest.approx(expected)


def test_dice_from_areas_vectorised():
    np.testing.assert_allclose(dice_from_areas([0, 0, 3], [0, 4, 3], [0, 0, 5]), [1.0, 0.0, 0.75])


def test_score_pairs_mean_per_class_and_all_empty():
    hit = encode(mask_with([(0, 0)]))
    # 8 pairs of 2 images: truth has 2 masks (classes 1 and 3); the prediction finds one and adds a false positive
    truth = [hit, "", "", "", "", "", hit, ""]
    pred = [hit, "", "", hit, "", "", "", ""]
    classes = [1, 2, 3, 4, 1, 2, 3, 4]
    score = score_pairs(pred, truth, classes, SHAPE)
    assert score.mean == pytest.approx(6 / 8)
    assert score.per_class == {1: 1.0, 2: 1.0, 3: 0.5, 4: 0.5}
    assert score.all_empty == pytest.approx(6 / 8)
    assert score.per_class_all_empty == {1: 0.5, 2: 1.0, 3: 0.5, 4: 1.0}
    assert score.n_pairs == 8


def test_score_pairs_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="lengths differ"):
        score_pairs(["", ""], [""], [1, 2], SHAPE)


@settings(max_examples=80, deadline=None)
@given(st.tuples(*[arrays(np.uint8, (3, 9, 14), elements=st.integers(0, 1))] * 2))
def test_property_rle_dice_equals_mask_dice(pair):
    pred, truth = pair
    expected = dice_masks(pred, truth)
    got = [dice_rles(encode(p), encode(t), (9, 14)) for p, t in zip(pred, truth)]
    np.testing.assert_allclose(got, expected)
