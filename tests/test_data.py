"""Tests for steelkit.data: training items (crops, dark-crop rejection, reproducibility) and the samplers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from steelkit import config
from steelkit.augment import class_augment_probability, group_flags
from steelkit.config import DataConfig
from steelkit.constants import NEW_TRAIN_COLUMNS, TRAIN_CSV, TRAIN_IMAGES
from steelkit.data import (
    DARK_TRIES,
    SAMPLERS,
    BalancedSampler,
    SteelDataset,
    _crop_origin,
    build_sampler,
    load_training_set,
)
from steelkit.synth import synthesize

H, W = 64, 384  # synthetic competition images, never square
NO_AUGMENT: dict = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic competition of 30 train images, 64x384."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root / "comp", n_train=30, n_test=0, seed=4, height=H, width=W, progress=False)
    return load_training_set(root / "comp")


def _dark_set(root: Path, bright_from: float, n: int = 6):
    """Clean 32x200 images, black (0) left of ``bright_from * width`` and textured steel (120..200) right of it."""
    images = root / TRAIN_IMAGES
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        grey = rng.integers(120, 200, size=(32, 200), dtype=np.uint8)
        grey[:, : int(bright_from * 200)] = 0
        cv2.imwrite(str(images / f"{i:09x}.jpg"), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    (root / TRAIN_CSV).write_text(",".join(NEW_TRAIN_COLUMNS) + "\n")
    return load_training_set(root)


def _dark_fraction(image: torch.Tensor, level: int = 20) -> float:
    return float((image < level).float().mean())


# -------------------------------------------------------------------------------------------------- items
def test_validation_items_are_whole_scaled_images(data):
    cfg = DataConfig(scale=0.5, crops=((16, 64),))
    dataset = SteelDataset(data, data.image_ids, cfg, train=False)
    assert dataset.size == (32, 192) and len(dataset) == 30
    image, masks = dataset[0]
    assert image.shape == (1, 32, 192) and masks.shape == (4, 32, 192)
    assert image.dtype == torch.uint8 and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 1}
    np.testing.assert_array_equal(masks.numpy(), data.masks(data.image_ids[0], (32, 192)))


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        (5, [(16, 64), (32, 96), (16, 64), (32, 96), (H, W)]),  # the last epoch is full size
        (None, [(16, 64), (32, 96), (16, 64), (32, 96), (16, 64)]),  # no known end: crops alternate forever
    ],
)
def test_crops_alternate_by_epoch(data, epochs, expected):
    cfg = DataConfig(crops=((16, 64), (32, 96)), full_size_epochs=1)
    dataset = SteelDataset(data, data.image_ids, cfg, train=True, seed=1, epochs=epochs)
    for epoch, size in enumerate(expected):
        dataset.set_epoch(epoch)
        assert dataset.crop_size() == size
        if epochs is not None:
            assert cfg.crop_for_epoch(epoch, epochs) in (size, None)
        for index in (0, 7):
            image, masks = dataset[index]
            assert image.shape == (1, *size) and masks.shape == (4, *size)


def test_crop_larger_than_the_image_is_clipped(data):
    cfg = DataConfig(scale=0.5, crops=((48, 96),))
    dataset = SteelDataset(data, data.image_ids, cfg, train=True)
    assert dataset.crop_size() == (32, 96)
    assert dataset[3][0].shape == (1, 32, 96)


def test_a_crop_is_one_window_of_image_and_masks(data):
    cfg = DataConfig(crops=((16, 64),), augment=NO_AUGMENT)
    full = SteelDataset(data, data.image_ids, cfg, train=False)
    crops = SteelDataset(data, data.image_ids, cfg, train=True, seed=2)
    for index in range(0, 30, 6):
        image, masks = (t.numpy() for t in full[index])
        crop, crop_masks = (t.numpy() for t in crops[index])
        windows = np.lib.stride_tricks.sliding_window_view(image[0], (16, 64))
        hits = np.argwhere((windows == crop[0]).all(axis=(2, 3)))
        assert len(hits), "the crop is no window of the image"
        assert any(np.array_equal(masks[:, y : y + 16, x : x + 64], crop_masks) for y, x in hits)


def test_crop_on_mask_keeps_a_defect_in_every_crop(data):
    cfg = DataConfig(crops=((16, 64),), crop_on_mask=1.0, dark_level=250, augment=NO_AUGMENT)
    defective = [i for i, f in zip(data.image_ids, data.flags) if f.any()]
    dataset = SteelDataset(data, defective, cfg, train=True, seed=0)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert all(dataset[i][1].any() for i in range(len(dataset)))
    uniform = SteelDataset(data, defective, DataConfig(crops=((16, 64),), augment=NO_AUGMENT), train=True)
    assert not all(uniform[i][1].any() for i in range(len(dataset)))  # without it some crops miss the defect


def test_items_depend_only_on_seed_epoch_and_index(data):
    cfg = DataConfig(crops=((32, 128),), augment={"hflip": 0.5, "vflip": 0.5, "noise": 0.5}, dark_level=10)
    a = SteelDataset(data, data.image_ids, cfg, train=True, seed=5)
    b = SteelDataset(data, data.image_ids, cfg, train=True, seed=5)
    order = [17, 3, 3, 29, 0]
    for index in order:  # any order, any repetition: as in any worker
        assert all(torch.equal(x, y) for x, y in zip(a[index], b[index]))
    b.set_epoch(1)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in order)
    c = SteelDataset(data, data.image_ids, cfg, train=True, seed=6)
    assert any(not torch.equal(a[i][0], c[i][0]) for i in order)
    # a repeat key (index + k * N, from the samplers) is the same image with fresh draws
    n = len(a)
    assert any(not torch.equal(a[i][0], a[i + n][0]) for i in order)
    whole = SteelDataset(data, data.image_ids, cfg, train=False)
    assert torch.equal(whole[4 + 2 * n][1], whole[4][1])


def test_class_weighted_probabilities_come_from_the_whole_training_set(data):
    cfg = DataConfig(augment={"noise": 1.0}, class_weighted_augment=True)
    ids = data.image_ids[5:20]
    dataset = SteelDataset(data, ids, cfg, train=True)
    expected = class_augment_probability(data.flags, data.flags[5:20])
    np.testing.assert_allclose(dataset.augment_probability, expected)
    assert SteelDataset(data, ids, DataConfig(augment={"noise": 1.0}), train=True).augment_probability is None


def test_non_dark_crops_avoid_the_dark_end(tmp_path):
    """Left 30% black: two thirds of the 32x50 crops are acceptable, so 10 tries all but never fail."""
    dark = _dark_set(tmp_path, bright_from=0.3)
    kwargs = {"crops": ((32, 50),), "augment": NO_AUGMENT}
    rejecting = SteelDataset(dark, dark.image_ids, DataConfig(dark_level=20, max_dark_fraction=0.2, **kwargs), True)
    uniform = SteelDataset(dark, dark.image_ids, DataConfig(**kwargs), True)
    fractions, control = [], []
    for epoch in range(4):
        rejecting.set_epoch(epoch)
        uniform.set_epoch(epoch)
        fractions += [_dark_fraction(rejecting[i][0]) for i in range(len(rejecting))]
        control += [_dark_fraction(uniform[i][0]) for i in range(len(uniform))]
    assert max(fractions) <= 0.2
    assert max(control) > 0.5  # uniform crops do land in the dark end


def test_all_dark_candidates_fall_back_to_the_least_dark(tmp_path):
    dark = _dark_set(tmp_path, bright_from=0.9)  # every 32x100 crop is at least 80% dark
    cfg = DataConfig(crops=((32, 100),), dark_level=20, max_dark_fraction=0.5, augment=NO_AUGMENT)
    image = cv2.imread(str(dark.image_path(dark.image_ids[0])), cv2.IMREAD_GRAYSCALE)
    masks = np.zeros((32, 200, 4), dtype=np.uint8)
    for seed in range(20):
        y, x = _crop_origin(image, masks, (32, 100), np.random.default_rng(seed), cfg)
        replay = np.random.default_rng(seed)
        candidates = [(int(replay.integers(0, 1)), int(replay.integers(0, 101))) for _ in range(DARK_TRIES)]
        darkness = [(image[cy : cy + 32, cx : cx + 100] < 20).mean() for cy, cx in candidates]
        assert (y, x) == candidates[int(np.argmin(darkness))]
    dataset = SteelDataset(dark, dark.image_ids, cfg, train=True)
    assert all(dataset[i][0].shape == (1, 32, 100) for i in range(len(dataset)))


# ------------------------------------------------------------------------------------------------ samplers
#: 14 images: 6 clean, class 1 x2, class 2 x1, class 3 x4 (one also class 4), class 4 x2
FLAGS = np.array(
    [[0, 0, 0, 0]] * 6
    + [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    + [[0, 0, 0, 1]],
    dtype=np.uint8,
)


def _epoch(sampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    keys = np.array(list(sampler))
    assert len(keys) == len(sampler)
    return keys


def test_sampler_registry_matches_the_config():
    assert set(SAMPLERS) == set(config.SAMPLERS)
    with pytest.raises(KeyError, match="balanced"):
        build_sampler("random", FLAGS, 0)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    sampler = build_sampler("shuffle", FLAGS, seed=3)
    first, second = _epoch(sampler, 0), _epoch(sampler, 1)
    assert sorted(first) == list(range(14)) and sorted(second) == list(range(14))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, _epoch(build_sampler("shuffle", FLAGS, seed=3), 0))


def test_balanced_round_robin_over_groups():
    sampler = build_sampler("balanced", FLAGS, seed=0)
    keys = _epoch(sampler, 0)
    assert len(keys) == 5 * 6
    assert len(set(keys.tolist())) == len(keys)  # repeats get distinct keys
    indices = keys % len(FLAGS)
    groups = group_flags(FLAGS)
    for position, index in enumerate(indices):
        assert groups[index, position % 5], f"position {position} should come from group {position % 5}"
    assert sorted(indices[0::5]) == list(range(6))  # every clean image exactly once
    for g in range(1, 5):  # every group cycled evenly
        counts = np.bincount(indices[g::5], minlength=14)[groups[:, g]]
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(keys, _epoch(build_sampler("balanced", FLAGS, seed=0), 0))
    assert not np.array_equal(keys, _epoch(sampler, 1))


def test_balanced_skips_empty_groups_and_handles_no_clean_images():
    no_class_2 = FLAGS[[i for i in range(14) if i != 8]]
    assert len(BalancedSampler(no_class_2, 0)) == 4 * 6
    defective = FLAGS[6:]  # groups of 0, 2, 1, 4, 2 images: rounds = largest group
    sampler = BalancedSampler(defective, 0)
    keys = _epoch(sampler, 0)
    assert len(keys) == 4 * 4
    assert sorted((keys % len(defective))[2::4]) == [3, 4, 5, 6]  # the class 3 group, each once


def test_weighted_draws_rare_classes_more_often():
    flags = np.array([[0, 0, 1, 0]] * 90 + [[1, 0, 0, 0]] * 10, dtype=np.uint8)
    sampler = build_sampler("weighted", flags, seed=0)
    draws = np.concatenate([_epoch(sampler, e) % 100 for e in range(5)])
    assert len(draws) == 500
    rare = (draws >= 90).sum()
    assert rare > 150  # weight 10 vs 1.1: about half of the draws (uniform sampling: 50)
    weights = sampler.weights()
    assert weights.sum() == pytest.approx(1.0)
    assert weights[95] / weights[0] == pytest.approx(9.0)


def test_weighted_image_with_two_classes_takes_the_mean():
    weights = build_sampler("weighted", FLAGS, 0).weights()
    freq = FLAGS.mean(axis=0)
    assert weights[12] / weights[9] == pytest.approx((1 / freq[2] + 1 / freq[3]) / 2 / (1 / freq[2]))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("flags", [FLAGS, FLAGS[:13]], ids=["even", "odd"])
def test_ddp_ranks_split_the_epoch(name, flags):
    whole = build_sampler(name, flags, seed=7)
    ranks = [build_sampler(name, flags, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(2):
        keys = _epoch(whole, epoch)
        parts = [_epoch(r, epoch) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == -(-len(keys) // 2)
        merged = np.empty(2 * len(parts[0]), dtype=np.int64)
        merged[0::2], merged[1::2] = parts
        np.testing.assert_array_equal(merged[: len(keys)] % len(flags), keys % len(flags))
        assert set((merged % len(flags)).tolist()) == set((keys % len(flags)).tolist())


def test_a_sampler_feeds_a_dataloader(data):
    cfg = DataConfig(crops=((16, 64),), sampler="balanced")
    dataset = SteelDataset(data, data.image_ids, cfg, train=True, seed=0)
    sampler = build_sampler(cfg.sampler, data.flags, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=0)
    images, masks = next(iter(loader))
    assert images.shape == (4, 1, 16, 64) and masks.shape == (4, 4, 16, 64)
