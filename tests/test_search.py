import itertools

import numpy as np
import pytest

from steelkit.metric import dice_masks
from steelkit.postprocess import PostProcess, apply_postprocess, binarize, remove_small_components
from steelkit.search import search_class, search_postprocess


def constructed_oof(seed=0, n=40, shape=(12, 50)):
    """OOF probabilities where confident true blobs and weaker, smaller false blobs make thresholds and areas matter."""
    rng = np.random.default_rng(seed)
    probs = (rng.random((n, 4) + shape) * 90).astype(np.uint8)
    truth = np.zeros((n, 4) + shape, dtype=np.uint8)
    for i, c in itertools.product(range(n), range(4)):
        r, col = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 12)
        if rng.random() < 0.4:
            truth[i, c, r : r + 5, col : col + 12] = 1
            probs[i, c, r : r + 5, col : col + 12] = rng.integers(120, 250)
        elif rng.random() < 0.5:
            probs[i, c, r : r + 2, col : col + rng.integers(1, 8)] = rng.integers(100, 200)
    return probs, truth


def brute_force(probs, truth, thresholds, areas):
    """Re-score every combination with the real post-processing and the mask metric."""
    best = (-1.0, None)
    for t, a in itertools.product(thresholds, areas):
        pred = np.stack([apply_postprocess(p[None].repeat(4, 0), PostProcess((t,) * 4, (a,) * 4))[0] for p in probs])
        score = dice_masks(pred, truth).mean()
        if score > best[0] + 1e-12:
            best = (score, (t, a))
    return best


@pytest.mark.parametrize("c", [0, 1, 2, 3])
def test_search_picks_the_brute_force_optimum(c):
    probs, truth = constructed_oof()
    thresholds, areas = [0.3, 0.45, 0.5, 0.6, 0.75], [0, 5, 12, 30, 61]
    found = search_class(probs[:, c], truth[:, c], thresholds, areas)
    score, (t, a) = brute_force(probs[:, c], truth[:, c], thresholds, areas)
    assert (found.threshold, found.min_area) == (t, a)
    assert found.dice == pytest.approx(score)
    assert found.table.shape == (5, 5) and found.table.max() == pytest.approx(score)
    assert found.empty == pytest.approx((truth[:, c].sum((1, 2)) == 0).mean())


def test_search_improves_on_the_baseline_and_scales_areas():
    probs, truth = constructed_oof(1)
    settings, results = search_postprocess(probs, truth, full_area_scale=4.0, area_fractions=(0.0, 0.01, 0.02))
    assert all(r.dice >= r.baseline for r in results)
    assert any(r.dice > r.baseline + 0.05 for r in results)
    assert settings.min_area == tuple(int(round(r.min_area * 4.0)) for r in results)


def test_binarize_uint8_matches_float():
    rng = np.random.default_rng(2)
    probs = rng.random((4, 9, 31))
    u8 = (probs * 255 + 0.5).astype(np.uint8)
    thresholds = (0.3, 0.5, 0.55, 0.9)
    agree = binarize(u8, thresholds) == binarize(u8 / 255.0, thresholds)
    assert agree.all()


def test_remove_small_components_uses_8_connectivity():
    mask = np.zeros((6, 20), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component of 2
    mask[3:6, 10:14] = True  # 12 pixels
    out = remove_small_components(mask, 3)
    assert out[:2].sum() == 0 and out[3:6, 10:14].all()
    assert remove_small_components(mask, 2).sum() == 14


def test_apply_postprocess_min_area_per_class():
    probs = np.zeros((4, 10, 40), dtype=np.uint8)
    probs[:, 0:4, 0:5] = 200  # 20 pixels in every class
    masks = apply_postprocess(probs, PostProcess((0.5,) * 4, (0, 20, 21, 80)), area_scale=0.25)
    assert masks.sum((1, 2)).tolist() == [20, 20, 20, 20]
    masks = apply_postprocess(probs, PostProcess((0.5,) * 4, (0, 20, 21, 81)), area_scale=1.0)
    assert masks.sum((1, 2)).tolist() == [20, 20, 0, 0]


def test_postprocess_validates():
    with pytest.raises(ValueError, match="needs 4 values"):
        PostProcess((0.5,) * 3)
    with pytest.raises(ValueError, match="must lie in"):
        PostProcess((0.5, 0.5, 0.5, 1.5))
