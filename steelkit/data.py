"""Training data: fold assignment, the torch Dataset and augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .constants import CLASS_IDS, IMAGE_ID, TRAIN_CSV, TRAIN_IMAGES
from .csvio import Labels, read_labels
from .images import list_images, read_grey
from .rle import decode
from .tensors import scaled_size

__all__ = ["SteelDataset", "TrainingSet", "assign_folds", "build_augment", "load_training_set"]


class TrainingSet:
    """Every train image with its masks.

    Attributes:
        folder: the competition folder.
        image_ids: every image in ``train_images`` (clean ones included), sorted.
        labels: the parsed train.csv.
        flags: ``(N, 4)`` uint8 class presence per image, aligned with ``image_ids``.
        shape: ``(H, W)`` of the images.
    """

    def __init__(self, folder: Path, image_ids: list[str], labels: Labels, shape: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.image_ids = image_ids
        self.labels = labels
        self.flags = labels.classes_of(image_ids)
        self.shape = shape
        self._rles: dict[str, dict[int, str]] = {}
        for image_id, class_id, rle in labels.frame[["ImageId", "ClassId", "EncodedPixels"]].itertuples(False):
            self._rles.setdefault(image_id, {})[int(class_id)] = rle

    def masks(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """``(4, h, w)`` uint8 {0, 1} masks of one image, resized (nearest) to ``size`` when given."""
        out = np.zeros((len(CLASS_IDS),) + tuple(self.shape), dtype=np.uint8)
        for class_id, rle in self._rles.get(image_id, {}).items():
            out[class_id - 1] = decode(rle, self.shape, image_id, class_id)
        if size is not None and tuple(size) != tuple(self.shape):
            h, w = size
            out = cv2.resize(out.transpose(1, 2, 0), (w, h), interpolation=cv2.INTER_NEAREST)
            out = out.reshape(h, w, -1).transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def image_path(self, image_id: str) -> Path:
        return self.folder / TRAIN_IMAGES / image_id


def load_training_set(folder: Path, on_error: str = "raise") -> TrainingSet:
    """Read ``train.csv`` and list ``train_images``; the image size is read from the first image.

    Raises:
        ValueError: no images, or train.csv names images that are not on disk (lists a few).
    """
    folder = Path(folder)
    image_ids = list_images(folder / TRAIN_IMAGES)
    if not image_ids:
        raise ValueError(f"{folder / TRAIN_IMAGES}: no .jpg images")
    shape = read_grey(folder / TRAIN_IMAGES / image_ids[0]).shape
    labels = read_labels(folder / TRAIN_CSV, shape=shape, on_error=on_error)
    missing = sorted(set(labels.image_ids) - set(image_ids))
    if missing:
        raise ValueError(f"{folder / TRAIN_CSV}: {len(missing)} images are not in {TRAIN_IMAGES}/, e.g. {missing[:3]}")
    return TrainingSet(folder, image_ids, labels, shape)


def assign_folds(flags: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """K-fold assignment stratified by class combination.

    Args:
        flags: ``(N, 4)`` class presence.
        folds: K.
        seed: shuffling seed.

    Returns:
        ``(N,)`` int64 fold index in ``0..K-1``. Combinations with fewer than K images are pooled.
    """
    from sklearn.model_selection import StratifiedKFold

    combo = flags.astype(np.int64) @ (1 << np.arange(flags.shape[1]))
    values, counts = np.unique(combo, return_counts=True)
    rare = np.isin(combo, values[counts < folds])
    combo = np.where(rare, -1, combo)
    if (combo == -1).sum() and (combo == -1).sum() < folds:
        # too few pooled images to stratify: put them with the most common combination
        combo = np.where(combo == -1, np.bincount(combo[combo >= 0]).argmax(), combo)
    out = np.zeros(len(flags), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(flags)), combo)):
        out[held_out] = k
    return out


def build_augment(cfg: DataConfig, train: bool):
    """albumentations pipeline from the data config: flips and a random crop (training only)."""
    import albumentations as A

    if not train:
        return None
    steps = [A.HorizontalFlip(p=cfg.hflip), A.VerticalFlip(p=cfg.vflip)]
    return A.Compose(steps)


class SteelDataset(Dataset):
    """Images and masks at training resolution.

    Items are ``(image, masks)``: ``(1, h, w)`` uint8 grey and ``(4, h, w)`` uint8 {0, 1}, where ``(h, w)`` is the
    image scaled by ``cfg.scale`` and, when training, randomly cropped to ``(crop_height, crop_width)``.
    Normalisation happens on the device (:func:`steelkit.tensors.normalize`), so batches travel as uint8.
    """

    def __init__(
        self, data: TrainingSet, image_ids: Sequence[str], cfg: DataConfig, train: bool, seed: int = 0
    ) -> None:
        self.data = data
        self.image_ids = list(image_ids)
        self.cfg = cfg
        self.train = train
        self.augment = build_augment(cfg, train)
        self.seed = seed
        self.epoch = 0
        self.size = scaled_size(data.shape, cfg.scale)

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Crops depend on (seed, epoch, index) only, so runs are reproducible whatever the worker count."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.image_ids[index]
        image = read_grey(self.data.image_path(image_id), self.data.shape)
        masks = self.data.masks(image_id, self.size).transpose(1, 2, 0)  # (h, w, 4)
        h, w = self.size
        if (h, w) != tuple(self.data.shape):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            ch = min(self.cfg.crop_height or h, h)
            cw = min(self.cfg.crop_width or w, w)
            y, x = _crop_origin(masks, (ch, cw), rng, self.cfg.crop_on_mask)
            image, masks = image[y : y + ch, x : x + cw], masks[y : y + ch, x : x + cw]
            self.augment.set_random_seed(int(rng.integers(2**31)))  # flips follow (seed, epoch, index) too
            out = self.augment(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(masks))
            image, masks = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(image))[None]
        masks = torch.from_numpy(np.ascontiguousarray(masks.reshape(masks.shape[0], masks.shape[1], -1))).permute(
            2, 0, 1
        )
        return image, masks.contiguous()


def _crop_origin(masks: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, on_mask: float) -> tuple[int, int]:
    """Top-left corner of a random crop of ``(H, W, 4)`` masks; with probability ``on_mask`` the crop is centred on a
    random defect pixel (when the image has one), so crops of defective images rarely miss the defect."""
    h, w = masks.shape[:2]
    ch, cw = crop
    if on_mask > 0 and rng.random() < on_mask:
        ys, xs = np.nonzero(masks.any(axis=2))
        if len(ys):
            i = int(rng.integers(len(ys)))
            return int(np.clip(ys[i] - ch // 2, 0, h - ch)), int(np.clip(xs[i] - cw // 2, 0, w - cw))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))


def folds_frame(image_ids: Sequence[str], folds: np.ndarray) -> pd.DataFrame:
    """The fold assignment file's content: ``ImageId, fold``."""
    return pd.DataFrame({IMAGE_ID: list(image_ids), "fold": np.asarray(folds, dtype=np.int64)})
