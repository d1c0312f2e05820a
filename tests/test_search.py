import itertools
import json

import numpy as np
import pytest

from steelkit.metric import dice_masks
from steelkit.postprocess import PostProcess, apply_postprocess, binarize, label_scores, remove_small_components
from steelkit.search import (
    SearchGrid,
    best_cell,
    class_table,
    component_counts,
    search_class,
    search_full,
    search_postprocess,
)


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


# --- joint search: pixel threshold x component size x label gate x minimum area, with the overfit guard -------------

SMALL_GRID = SearchGrid(
    thresholds=(0.3, 0.5, 0.62, 0.8),
    min_components=(0, 2, 4, 9),
    label_thresholds=(0.0, 0.6, 0.9),  # 0.6 = 153 / 255 exactly: ties between score and gate occur
    min_areas=(0, 3, 20, 45),
)


def blobby_oof(seed, n=24, shape=(12, 50), dtype=np.uint8):
    """One class of OOF probabilities: faint speckle, textured blobs of many sizes (they split at high thresholds),
    truth overlapping some blobs, shifted, and some truth the model missed."""
    rng = np.random.default_rng(seed)
    probs = rng.random((n,) + shape) ** 6 * 0.7
    truth = np.zeros((n,) + shape, dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            h, w = rng.integers(1, 6), rng.integers(1, 15)
            r, c = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
            box = (i, slice(r, r + h), slice(c, c + w))
            probs[box] = np.maximum(probs[box], rng.uniform(0.25, 1.0) * rng.uniform(0.5, 1.0, (h, w)))
            if rng.random() < 0.6:
                shift = rng.integers(0, 3)
                truth[i, r : r + h, max(c - shift, 0) : c + w - shift] = 1
        if rng.random() < 0.15:
            truth[i, 1:4, 40:47] = 1
    if dtype == np.uint8:
        return np.round(probs * 255).astype(np.uint8), truth
    return probs.astype(dtype), truth


def grid_cells(grid, shape):
    return list(itertools.product(grid.thresholds, grid.min_components, grid.label_thresholds, grid.areas(shape)))


def brute_table(probs, truth, grid, label_score=None, source="max_prob"):
    """Mean Dice of every cell with the real apply_postprocess and dice_masks, four cells per call (one per class)."""
    cells = grid_cells(grid, probs.shape[-2:])
    scores = []
    for start in range(0, len(cells), 4):
        chunk = cells[start : start + 4]
        chunk += [chunk[-1]] * (4 - len(chunk))
        t, m, g, a = zip(*chunk)
        settings = PostProcess(t, a, m, g, label_source=source)
        pred = np.stack(
            [
                apply_postprocess(
                    p[None].repeat(4, 0),
                    settings,
                    label_probs=None if label_score is None else np.full(4, label_score[i]),
                )
                for i, p in enumerate(probs)
            ]
        )
        scores.extend(dice_masks(pred, truth[:, None].repeat(4, 1)).mean(0)[: len(cells) - start])
    shape = (
        len(grid.thresholds),
        len(grid.min_components),
        len(grid.label_thresholds),
        len(grid.areas(probs.shape[-2:])),
    )
    return np.array(scores).reshape(shape)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("classifier", [False, True])
def test_class_table_equals_brute_force(dtype, classifier):
    probs, truth = blobby_oof(3, dtype=dtype)
    label_score = np.random.default_rng(4).integers(0, 11, len(probs)) / 10 if classifier else None
    table = class_table(probs, truth, SMALL_GRID, label_score)
    reference = brute_table(probs, truth, SMALL_GRID, label_score, "classifier" if classifier else "max_prob")
    assert table.shape == (4, 4, 3, 4)
    np.testing.assert_allclose(table, reference, rtol=0, atol=1e-12)
    assert table.std() > 0.02  # the data make every axis matter somewhere


def test_component_counts_match_remove_small_components():
    probs, truth = blobby_oof(5, n=10, shape=(20, 64))
    thresholds, sizes = (0.0, 0.2, 0.5, 0.51, 0.9), (0, 1, 3, 7.5, 30)
    area, inter, truth_area = component_counts(probs, truth, thresholds, sizes)
    for (k, t), (j, m) in itertools.product(enumerate(thresholds), enumerate(sizes)):
        for i in range(len(probs)):
            kept = remove_small_components(binarize(probs[i][None], [t])[0], m)
            assert (area[k, j, i], inter[k, j, i]) == (kept.sum(), (kept & (truth[i] > 0)).sum())
    assert truth_area.tolist() == truth.sum((1, 2)).tolist()


def test_search_full_without_guard_picks_the_brute_force_optimum_and_applies_as_scored():
    data = [blobby_oof(seed, n=20) for seed in (10, 11, 12, 13)]
    probs, truth = np.stack([p for p, _ in data], 1), np.stack([t for _, t in data], 1)
    label_probs = np.random.default_rng(0).random(probs.shape[:2])
    found = search_full(probs, truth, SMALL_GRID, label_probs=label_probs, area_scale=4.0, guard=False)
    assert found.settings.label_source == "classifier"
    for c, result in enumerate(found.classes):
        reference = brute_table(probs[:, c], truth[:, c], SMALL_GRID, label_probs[:, c], "classifier")
        np.testing.assert_allclose(result.table, reference, rtol=0, atol=1e-12)
        assert result.dice_searched == pytest.approx(reference.max(), abs=1e-12)
        assert result.accepted and result.dice_after == result.dice_searched
        assert result.dice_before == pytest.approx(reference[1, 0, 0, 0], abs=1e-12)  # 0.5, no sizes, no gate
    # the returned settings (full-resolution sizes) score exactly the searched Dice when applied at scale 1/4
    pred = np.stack([apply_postprocess(p, found.settings, 0.25, label_probs[i]) for i, p in enumerate(probs)])
    np.testing.assert_allclose(dice_masks(pred, truth).mean(0), [r.dice_after for r in found.classes], atol=1e-12)
    assert found.settings.min_area == tuple(int(round(r.min_area * 4)) for r in found.classes)
    report = json.loads(json.dumps(found.to_dict()))
    assert report["dice_after"] >= report["dice_before"] and len(report["classes"]) == 4
    assert PostProcess.from_dict(report["postprocess"]) == found.settings


def guard_oof(n_fp, n_weak, n_true=30, n_clean=5, shape=(12, 50)):
    """Confident true blobs (right at any threshold), ``n_fp`` clean images with a 0.62 false-positive blob and
    ``n_weak`` images whose true blob is only 0.62: a threshold above 0.62 fixes the first and breaks the second."""
    n = n_true + n_fp + n_weak + n_clean
    probs = np.zeros((n, 4) + shape, dtype=np.float32)
    truth = np.zeros((n, 4) + shape, dtype=np.uint8)
    blob = (slice(None), slice(None), slice(3, 6), slice(10, 20))
    probs[:n_true][blob], truth[:n_true][blob] = 0.95, 1
    probs[n_true : n_true + n_fp][blob] = 0.62
    probs[n_true + n_fp : n_true + n_fp + n_weak][blob], truth[n_true + n_fp : n_true + n_fp + n_weak][blob] = 0.62, 1
    return probs, truth


GUARD_GRID = SearchGrid(
    thresholds=(0.5, 0.7), min_components=(0, 8), label_thresholds=(0.0, 0.7), min_areas=(0, 20, 40)
)


def test_guard_keeps_defaults_when_the_gain_is_noise():
    probs, truth = guard_oof(n_fp=3, n_weak=2)  # the higher threshold wins by one image of 40
    loose = search_full(probs, truth, GUARD_GRID, guard=False)
    assert loose.settings.pixel_threshold == (0.7,) * 4  # the plain argmax switches
    assert loose.classes[0].dice_searched == pytest.approx(loose.classes[0].dice_before + 1 / 40)
    found = search_full(probs, truth, GUARD_GRID, repeats=8, seed=1)
    assert found.settings == PostProcess()
    for result in found.classes:
        assert not result.accepted and result.reason.startswith("kept defaults: held-out gain")
        assert result.searched["threshold"] == 0.7 and result.threshold == 0.5
        assert max(result.held_out_gains) <= 1e-12 and len(result.held_out_gains) == 8
        assert result.dice_after == result.dice_before
    # off-grid defaults (sizes in full-resolution pixels) come back exactly as given
    defaults = PostProcess(min_area=(7,) * 4, min_component=(3,) * 4)
    assert search_full(probs, truth, GUARD_GRID, defaults=defaults, area_scale=4.0, repeats=8).settings == defaults


def test_guard_accepts_a_consistent_gain():
    probs, truth = guard_oof(n_fp=12, n_weak=0, n_true=20, n_clean=8)
    found = search_full(probs, truth, GUARD_GRID, repeats=8, seed=1)
    assert found.settings.pixel_threshold == (0.7,) * 4
    for result in found.classes:
        assert result.accepted and result.reason.startswith("accepted: held-out gain +")
        assert min(result.held_out_gains) > 0
        assert result.dice_after == pytest.approx(1.0)
    assert found.to_dict()["classes"][0]["positive_splits"] == 8


def test_guard_is_seeded():
    probs, truth = blobby_oof(7, n=30)
    probs, truth = probs[:, None].repeat(4, 1), truth[:, None].repeat(4, 1)
    first, again = (search_full(probs, truth, SMALL_GRID, repeats=5, seed=3) for _ in range(2))
    assert first.classes[0].held_out_gains == again.classes[0].held_out_gains


def test_best_cell_prefers_the_defaults_and_coarse_values_on_ties():
    table = np.zeros((3, 4, 2, 5))
    assert best_cell(table, (1, 0, 0, 0)) == (1, 0, 0, 0)
    table[2, 3, 1, 4] = table[0, 1, 0, 2] = 0.5
    assert best_cell(table, (1, 0, 0, 0)) == (0, 1, 0, 2)  # nearer the defaults than (2, 3, 1, 4)
    table[2, 3, 1, 0] = 0.5 + 1e-12
    assert best_cell(table, (1, 0, 0, 0)) == (0, 1, 0, 2)  # within the tie tolerance: the nearer one stays
    table[2, 3, 1, 0] = 0.5 + 1e-6
    assert best_cell(table, (1, 0, 0, 0)) == (2, 3, 1, 0)
    table[1, 1, 0, 0] = table[1, 0, 0, 1] = 0.5 + 1e-6
    assert best_cell(table, (1, 0, 0, 0)) == (1, 0, 0, 1)  # same distance: the smaller component size
    table[1, 0, 0, 4] = 0.6
    assert best_cell(table, (1, 0, 0, 0)) == (1, 0, 0, 4)


def test_search_grid_sorts_and_validates():
    grid = SearchGrid(thresholds=(0.5, 0.3, 0.5), min_areas=(10, 0))
    assert grid.thresholds == (0.3, 0.5) and grid.areas((12, 50)) == [0, 10]
    assert SearchGrid(area_fractions=(0.0, 0.01)).areas((100, 100)) == [0, 100]
    with pytest.raises(ValueError, match="must lie in"):
        SearchGrid(label_thresholds=(0.0, 1.5))


def test_search_full_validates_label_probs_and_defaults():
    probs, truth = guard_oof(1, 1)
    with pytest.raises(ValueError, match="label_probs must be"):
        search_full(probs, truth, GUARD_GRID, label_probs=np.ones((len(probs), 3)))
    with pytest.raises(ValueError, match="defaults gate on"):
        search_full(
            probs, truth, GUARD_GRID, defaults=PostProcess(label_threshold=(0.5,) * 4, label_source="classifier")
        )


# --- post-processing: label gate, order, round trips ------------------------------------------------------------------


def test_apply_postprocess_label_gate_max_prob():
    probs = np.zeros((4, 10, 40), dtype=np.uint8)
    probs[:, 2:5, 3:13] = [[[150]], [[160]], [[200]], [[255]]]  # max 0.59, 0.63, 0.78, 1.0
    settings = PostProcess((0.5,) * 4, label_threshold=(0.6, 0.6, 0.8, 1.0))
    assert apply_postprocess(probs, settings).sum((1, 2)).tolist() == [0, 30, 0, 30]
    assert apply_postprocess(probs / 255.0, settings).sum((1, 2)).tolist() == [0, 30, 0, 30]
    np.testing.assert_allclose(label_scores(probs), [150 / 255, 160 / 255, 200 / 255, 1.0])
    np.testing.assert_allclose(label_scores(probs[None].repeat(3, 0)), np.tile(label_scores(probs), (3, 1)))


def test_apply_postprocess_label_gate_classifier():
    probs = np.zeros((4, 10, 40), dtype=np.float32)
    probs[:, 2:5, 3:13] = 0.9
    settings = PostProcess(label_threshold=(0.5, 0.5, 0.0, 0.7), label_source="classifier")
    masks = apply_postprocess(probs, settings, label_probs=np.array([0.49, 0.5, 0.0, 0.95]))
    assert masks.sum((1, 2)).tolist() == [0, 30, 30, 30]
    with pytest.raises(ValueError, match="pass label_probs"):
        apply_postprocess(probs, settings)
    with pytest.raises(ValueError, match="label_probs must be"):
        apply_postprocess(probs, settings, label_probs=np.ones(3))
    # no gate on: the classifier's probabilities are not needed
    off = PostProcess(label_source="classifier")
    assert apply_postprocess(probs, off).sum() == 120


def test_apply_postprocess_components_then_area():
    probs = np.zeros((4, 12, 50), dtype=np.uint8)
    probs[:, 0:2, 0:2] = 200  # a component of 4
    probs[:, 5:9, 20:30] = 200  # a component of 40
    settings = PostProcess((0.5,) * 4, min_area=(0, 41, 40, 44), min_component=(5, 0, 5, 0))
    assert apply_postprocess(probs, settings).sum((1, 2)).tolist() == [40, 44, 40, 44]
    settings = PostProcess((0.5,) * 4, min_area=(41, 0, 0, 0), min_component=(5, 0, 0, 0))
    assert apply_postprocess(probs, settings).sum((1, 2)).tolist() == [0, 44, 44, 44]


def test_postprocess_round_trip():
    settings = PostProcess((0.4, 0.5, 0.6, 0.7), (0, 10, 20, 30), (0, 5, 0, 5), (0.0, 0.5, 0.6, 0.0), "classifier")
    assert PostProcess.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    old = {"pixel_threshold": [0.4, 0.5, 0.6, 0.7], "min_area": [0, 1, 2, 3], "min_component": [0] * 4, "source": "x"}
    loaded = PostProcess.from_dict(old)
    assert (
        loaded.label_threshold == (0.0,) * 4 and loaded.label_source == "max_prob" and loaded.min_area == (0, 1, 2, 3)
    )
    assert PostProcess.from_dict({}) == PostProcess()
    with pytest.raises(ValueError, match="label_source"):
        PostProcess(label_source="cls")
    with pytest.raises(ValueError, match="label_threshold"):
        PostProcess(label_threshold=(0.0, 0.0, 0.0, 2.0))


def test_search_full_scores_off_grid_defaults_exactly_and_keeps_them_as_given():
    probs, truth = blobby_oof(21, n=24)
    probs, truth = probs[:, None].repeat(4, 1), truth[:, None].repeat(4, 1)
    defaults = PostProcess((0.45, 0.5, 0.55, 0.6), min_area=(100, 0, 30, 0), min_component=(6, 0, 0, 10))
    found = search_full(probs, truth, SMALL_GRID, defaults=defaults, area_scale=4.0, repeats=6)
    pred = np.stack([apply_postprocess(p, defaults, 0.25) for p in probs])
    np.testing.assert_allclose(dice_masks(pred, truth).mean(0), [r.dice_before for r in found.classes], atol=1e-12)
    assert 1.5 in found.classes[0].axes["min_component"] and 25 in found.classes[0].axes["min_area"]
    for c, result in enumerate(found.classes):
        if not result.accepted:
            assert found.settings.min_area[c] == defaults.min_area[c]
            assert found.settings.min_component[c] == defaults.min_component[c]
            assert result.dice_after == result.dice_before
    assert found.settings.label_source == "max_prob"
