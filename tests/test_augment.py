"""Tests for steelkit.augment: the registry, seeded pipelines, defect blackout, validation and class weights."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from steelkit.augment import (
    AUGMENTATIONS,
    UNGATED,
    build_augment,
    class_augment_probability,
    group_flags,
    validate_augment,
)
from steelkit.config import DataConfig

H, W = 40, 104  # never square
GEOMETRIC = ("hflip", "vflip", "shift_scale_rotate")
PHOTOMETRIC = ("brightness_contrast", "gamma", "noise", "coarse_dropout")


def _masks() -> np.ndarray:
    """``(H, W, 4)`` uint8 {0, 1}: class 1 and class 3 blocks that do not overlap (class 2 and 4 empty)."""
    masks = np.zeros((H, W, 4), dtype=np.uint8)
    masks[4:20, 8:40, 0] = 1
    masks[22:36, 56:96, 2] = 1
    return masks


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 226, size=(H, W), dtype=np.uint8)


def test_import_does_not_import_albumentations():
    code = "import sys, steelkit.augment; assert 'albumentations' not in sys.modules, 'albumentations imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_covers_the_config_names():
    assert set(PHOTOMETRIC + GEOMETRIC + ("defect_blackout",)) == set(AUGMENTATIONS)
    assert set(UNGATED) <= set(AUGMENTATIONS)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_keeps_shapes_dtypes_and_binary_masks(name):
    augment = build_augment({name: 1.0}, train=True)
    image, masks = _image(), _masks()
    changed = False
    for seed in range(4):
        out_image, out_masks = augment(image, masks, seed)
        assert out_image.shape == (H, W) and out_image.dtype == np.uint8
        assert out_masks.shape == (H, W, 4) and out_masks.dtype == np.uint8
        assert set(np.unique(out_masks)) <= {0, 1}
        assert out_image.flags.c_contiguous and out_masks.flags.c_contiguous
        changed |= not np.array_equal(out_image, image)
    assert changed, f"{name} at p=1 never changed the image"
    np.testing.assert_array_equal(image, _image())  # inputs are not modified in place
    np.testing.assert_array_equal(masks, _masks())


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_augmentations_move_image_and_masks_together(name):
    masks = _masks()
    image = (255 * masks.any(axis=2)).astype(np.uint8)
    augment = build_augment({name: 1.0}, train=True)
    moved = False
    for seed in range(6):
        out_image, out_masks = augment(image, masks, seed)
        agree = ((out_image > 127) == out_masks.any(axis=2)).mean()
        assert agree == 1.0 if name != "shift_scale_rotate" else agree > 0.97, (seed, agree)
        moved |= not np.array_equal(out_masks, masks)
    assert moved, f"{name} never moved the masks"


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_photometric_augmentations_leave_masks_untouched(name):
    augment = build_augment({name: 1.0}, train=True)
    for seed in range(3):
        _, out_masks = augment(_image(), _masks(), seed)
        np.testing.assert_array_equal(out_masks, _masks())


FULL = {
    "hflip": 0.5,
    "vflip": 0.5,
    "shift_scale_rotate": 0.5,
    "brightness_contrast": 0.5,
    "gamma": {"p": 0.5, "gamma_limit": [90, 110]},
    "noise": 0.5,
    "coarse_dropout": {"p": 0.5, "holes": 2, "size": 0.1},
    "defect_blackout": 0.3,
}


def test_same_seed_same_output_other_seeds_differ():
    a, b = build_augment(FULL, train=True), build_augment(FULL, train=True)
    outputs = []
    for seed in range(5):
        first, second = a(_image(), _masks(), seed), b(_image(), _masks(), seed)
        assert all(np.array_equal(x, y) for x, y in zip(first, second))
        again = a(_image(), _masks(), seed)  # the same object again: no hidden state carried between calls
        assert all(np.array_equal(x, y) for x, y in zip(first, again))
        outputs.append(first[0])
    assert len({o.tobytes() for o in outputs}) == len(outputs)


def test_pipeline_survives_pickling():
    """DataLoader workers started by spawn receive the dataset (and its pipeline) pickled."""
    augment = build_augment(FULL, train=True)
    clone = pickle.loads(pickle.dumps(augment))
    for seed in range(3):
        assert all(
            np.array_equal(x, y) for x, y in zip(augment(_image(), _masks(), seed), clone(_image(), _masks(), seed))
        )


def test_flips_are_drawn_independently():
    """albumentations' Compose.set_random_seed gives every transform one seed: both flips would always agree."""
    augment = build_augment({"hflip": 0.5, "vflip": 0.5}, train=True)
    image = np.zeros((H, W), dtype=np.uint8)
    image[0, 0] = 255  # the marked corner tells which flips ran
    seen = set()
    for seed in range(40):
        out, _ = augment(image, _masks(), seed)
        y, x = np.argwhere(out == 255)[0]
        seen.add((bool(y), bool(x)))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_defect_blackout_blacks_out_one_class():
    image, masks = _image(), _masks()
    augment = build_augment({"defect_blackout": 1.0}, train=True)
    chosen = set()
    for seed in range(12):
        out_image, out_masks = augment(image, masks, seed)
        cleared = [c for c in range(4) if masks[..., c].any() and not out_masks[..., c].any()]
        assert len(cleared) == 1
        c = cleared[0]
        chosen.add(c)
        others = [k for k in range(4) if k != c]
        np.testing.assert_array_equal(out_masks[..., others], masks[..., others])
        np.testing.assert_array_equal(out_image == 0, masks[..., c] == 1)  # the image has no 0 of its own
        np.testing.assert_array_equal(out_image[masks[..., c] == 0], image[masks[..., c] == 0])
    assert chosen == {0, 2}
    clean = np.zeros_like(masks)
    out_image, out_masks = augment(image, clean, 0)
    assert np.array_equal(out_image, image) and np.array_equal(out_masks, clean)


def test_not_training_is_the_identity():
    augment = build_augment(FULL, train=False)
    image, masks = augment(_image(), _masks(), 3)
    assert np.array_equal(image, _image()) and np.array_equal(masks, _masks())


def test_class_gate_skips_only_the_gated_transforms():
    spec = {"hflip": 1.0, "noise": 1.0}
    image = _image()
    flipped = image[:, ::-1]
    closed = build_augment(spec, train=True, class_probability=0.0)
    opened = build_augment(spec, train=True, class_probability=1.0)
    for seed in range(3):
        np.testing.assert_array_equal(closed(image, _masks(), seed)[0], flipped)  # noise gated off, flip still runs
        assert not np.array_equal(opened(image, _masks(), seed)[0], flipped)
        # a per-call probability overrides the default
        np.testing.assert_array_equal(opened(image, _masks(), seed, class_probability=0.0)[0], flipped)
    runs = [not np.array_equal(closed(image, _masks(), s, class_probability=0.3)[0], flipped) for s in range(300)]
    assert 0.2 < np.mean(runs) < 0.4


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ({"rot90": 0.5}, KeyError, "defect_blackout"),
        ({"hflip": 1.5}, ValueError, "[0, 1]"),
        ({"hflip": -0.1}, ValueError, "[0, 1]"),
        ({"hflip": True}, ValueError, "[0, 1]"),
        ({"gamma": {"gamma_limit": [80, 120]}}, ValueError, "needs 'p'"),
        ({"gamma": {"p": 0.5, "limit": 0.1}}, ValueError, "gamma_limit"),
        ({"noise": {"p": 0.5, "std_range": "big"}}, ValueError, "pair of numbers"),
        ([("hflip", 0.5)], ValueError, "mapping"),
    ],
)
def test_invalid_specs_are_rejected(spec, error, words):
    with pytest.raises(error) as info:
        validate_augment(spec)
    assert words in str(info.value)


def test_config_validates_its_augment():
    with pytest.raises(KeyError, match="hflip"):
        DataConfig(augment={"rot90": 0.5})
    DataConfig(augment={"shift_scale_rotate": {"p": 0.5, "rotate": 5}, "defect_blackout": 0.2})


#: 8 images: 4 clean, one class 1, two class 3, one classes 3 and 4; class 2 never seen
FLAGS = np.array(
    [[0, 0, 0, 0]] * 4 + [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
    dtype=np.uint8,
)


@pytest.mark.parametrize(
    ("image_flags", "expected"),
    [
        ([0, 0, 0, 0], 1 - 4 / 8),  # clean: 1 - fraction of clean images
        ([1, 0, 0, 0], 1 - 1 / 8),
        ([0, 0, 1, 0], 1 - 3 / 8),
        ([0, 0, 1, 1], 1 - 1 / 8),  # the rarest present class wins
        ([0, 1, 1, 0], 1.0),  # a class absent from the table has frequency 0
    ],
)
def test_class_augment_probability(image_flags, expected):
    assert class_augment_probability(FLAGS, np.array(image_flags)) == pytest.approx(expected)


def test_class_augment_probability_of_many_images():
    out = class_augment_probability(FLAGS, FLAGS)
    assert out.shape == (8,)
    np.testing.assert_allclose(out, [0.5] * 4 + [0.875, 0.625, 0.625, 0.875])


def test_group_flags():
    groups = group_flags(FLAGS)
    assert groups.shape == (8, 5) and groups.dtype == bool
    np.testing.assert_array_equal(groups.sum(axis=0), [4, 1, 0, 3, 1])
