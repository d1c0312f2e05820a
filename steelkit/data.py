"""Training data: the training set, fold assignment, the torch Dataset (crops and augmentation) and the samplers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .augment import build_augment, class_augment_probability, group_flags, group_frequencies
from .config import DataConfig
from .constants import CLASS_IDS, IMAGE_ID, TRAIN_CSV, TRAIN_IMAGES
from .csvio import Labels, read_labels
from .images import list_images, read_grey, resize_channels
from .rle import decode
from .tensors import scaled_size

__all__ = [
    "DARK_TRIES",
    "SAMPLERS",
    "BalancedSampler",
    "EpochSampler",
    "ShuffleSampler",
    "SteelDataset",
    "TrainingSet",
    "WeightedSampler",
    "assign_folds",
    "build_sampler",
    "folds_frame",
    "load_training_set",
]


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
            out = resize_channels(out, size, cv2.INTER_NEAREST)
        return np.ascontiguousarray(out)

    def image_path(self, image_id: str) -> Path:
        return self.folder / TRAIN_IMAGES / image_id


def load_training_set(folder: Path, on_error: str = "raise") -> TrainingSet:
    """Read ``train.csv`` and list ``train_images``; the image size is read from the first image.

    Raises:
        ValueError: no images; a malformed train.csv row (file, row and problem; ``on_error="skip"`` drops and counts
            them in ``labels.skipped``); or train.csv names images that are not on disk (lists a few with their rows).
    """
    folder = Path(folder)
    image_ids = list_images(folder / TRAIN_IMAGES)
    if not image_ids:
        raise ValueError(f"{folder / TRAIN_IMAGES}: no .jpg images")
    shape = read_grey(folder / TRAIN_IMAGES / image_ids[0]).shape
    labels = read_labels(folder / TRAIN_CSV, shape=shape, on_error=on_error)
    on_disk = set(image_ids)
    missing = [i for i in labels.image_ids if i not in on_disk]
    if missing:
        rows = labels.frame.groupby(IMAGE_ID)["row"].min()
        shown = "; ".join(f"row {rows[i]}: {i}" if i in rows.index else i for i in missing[:5])
        raise ValueError(
            f"{folder / TRAIN_CSV}: {len(missing)} images are not in {TRAIN_IMAGES}/ ({shown}"
            f"{' ...' if len(missing) > 5 else ''})"
        )
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


class SteelDataset(Dataset):
    """Images and masks at training resolution.

    Items are ``(image, masks)``: ``(1, h, w)`` uint8 grey and ``(4, h, w)`` uint8 {0, 1}. ``(h, w)`` is
    :attr:`size` (the image scaled by ``cfg.scale``) or, when training, the epoch's crop
    ``cfg.crop_for_epoch(epoch, epochs)`` (clipped to :attr:`size`), so every item of an epoch has the same size.
    Normalisation happens on the device (:func:`steelkit.tensors.normalize`), so batches travel as uint8.

    A training item depends only on ``(seed, epoch, key)``, whatever the worker count: its crop and augmentation are
    drawn from ``np.random.default_rng((seed, epoch, key))``. ``key`` is an index into :attr:`image_ids` or, from the
    samplers of :func:`build_sampler`, ``index + k * len(self)`` for the ``k``-th repeat of an image within an epoch,
    so that repeats get fresh crops and augmentations.

    Crops (training, when the epoch has one):

    * with probability ``cfg.crop_on_mask``, a defective image's crop is centred on one of its defect pixels;
    * otherwise the crop is uniform; with ``cfg.dark_level > 0`` a crop with more than ``cfg.max_dark_fraction`` of
      pixels below ``dark_level`` (off the sheet) is redrawn, up to :data:`DARK_TRIES` draws, after which the least
      dark of them is kept (for a sheet that is dark nearly everywhere, the crop nearest to the steel).

    Augmentation: :func:`steelkit.augment.build_augment` of ``cfg.augment``; with ``cfg.class_weighted_augment``
    its gated transforms run with probability :func:`steelkit.augment.class_augment_probability` of the image,
    the class frequencies taken over every image of ``data`` (``TrainingSet.flags``).

    Args:
        data: the training set.
        image_ids: the images of this dataset (e.g. the training folds).
        cfg: the data config.
        train: crops and augmentation (``False``: whole scaled images, untouched).
        seed: seed of the crops and augmentations.
        epochs: the run's epoch count, for ``cfg.crop_for_epoch`` (``full_size_epochs`` are the last ones);
            ``None`` = a run without end: crops alternate and full-size epochs never start.
    """

    def __init__(
        self,
        data: TrainingSet,
        image_ids: Sequence[str],
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        epochs: int | None = None,
    ) -> None:
        self.data = data
        self.image_ids = list(image_ids)
        self.cfg = cfg
        self.train = train
        self.seed = seed
        self.epochs = epochs
        self.epoch = 0
        self.size = scaled_size(data.shape, cfg.scale)
        self.augment = build_augment(cfg.augment, train)
        self.augment_probability = None
        if train and cfg.class_weighted_augment:
            row = {image_id: i for i, image_id in enumerate(data.image_ids)}
            flags = data.flags[[row[i] for i in self.image_ids]].reshape(-1, data.flags.shape[1])
            self.augment_probability = np.atleast_1d(class_augment_probability(data.flags, flags))

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its crop size and the random draws of its items."""
        self.epoch = epoch

    def crop_size(self, epoch: int | None = None) -> tuple[int, int]:
        """``(h, w)`` of the items of an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return self.size
        # epochs=None: as if the run ended after this epoch's full-size tail, so this epoch is never full size
        epochs = self.epochs if self.epochs is not None else epoch + 1 + self.cfg.full_size_epochs
        crop = self.cfg.crop_for_epoch(epoch, epochs)
        h, w = self.size
        return (h, w) if crop is None else (min(crop[0], h), min(crop[1], w))

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(key) % len(self.image_ids)
        image_id = self.image_ids[index]
        image = read_grey(self.data.image_path(image_id), self.data.shape)
        masks = self.data.masks(image_id, self.size).transpose(1, 2, 0)  # (h, w, 4)
        h, w = self.size
        if (h, w) != tuple(self.data.shape):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, int(key)))
            ch, cw = self.crop_size()
            if (ch, cw) != (h, w):
                y, x = _crop_origin(image, masks, (ch, cw), rng, self.cfg)
                image, masks = image[y : y + ch, x : x + cw], masks[y : y + ch, x : x + cw]
            gate = None if self.augment_probability is None else float(self.augment_probability[index])
            image, masks = self.augment(image, masks, int(rng.integers(2**31)), class_probability=gate)
        image = torch.from_numpy(np.ascontiguousarray(image))[None]
        masks = torch.from_numpy(np.ascontiguousarray(masks.reshape(masks.shape[0], masks.shape[1], -1)))
        return image, masks.permute(2, 0, 1).contiguous()


#: random draws of a non-dark crop before the least dark one is kept
DARK_TRIES = 10


def _crop_origin(
    image: np.ndarray, masks: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, cfg: DataConfig
) -> tuple[int, int]:
    """Top-left corner ``(y, x)`` of a training crop (see :class:`SteelDataset`).

    Args:
        image: ``(H, W)`` uint8 grey.
        masks: ``(H, W, 4)`` uint8 {0, 1}.
        crop: ``(h, w)``, at most ``(H, W)``.
        rng: the item's generator.
        cfg: ``crop_on_mask``, ``dark_level`` and ``max_dark_fraction``.
    """
    h, w = masks.shape[:2]
    ch, cw = crop
    if cfg.crop_on_mask > 0 and rng.random() < cfg.crop_on_mask:
        ys, xs = np.nonzero(masks.any(axis=2))
        if len(ys):
            i = int(rng.integers(len(ys)))
            return int(np.clip(ys[i] - ch // 2, 0, h - ch)), int(np.clip(xs[i] - cw // 2, 0, w - cw))
    if cfg.dark_level <= 0:
        return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    dark = image < cfg.dark_level
    best, best_fraction = (0, 0), np.inf
    for _ in range(DARK_TRIES):
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        fraction = float(dark[y : y + ch, x : x + cw].mean())
        if fraction <= cfg.max_dark_fraction:
            return y, x
        if fraction < best_fraction:
            best, best_fraction = (y, x), fraction
    return best


# ------------------------------------------------------------------------------------------------ samplers
#: appended to ``(seed, epoch)`` to seed a sampler's epoch, so its stream differs from every item's
_SAMPLER_STREAM = 2**40


class EpochSampler(Sampler[int]):
    """Base of the samplers: an epoch's list of keys, deterministic given ``(seed, epoch)``, split across ranks.

    Subclasses implement :meth:`epoch_indices`. :meth:`__iter__` turns the list into keys (the ``k``-th repeat of
    image ``i`` within the epoch becomes ``i + k * N``, see :class:`SteelDataset`), pads it by wrapping around to a
    multiple of ``num_replicas`` and yields ``keys[rank::num_replicas]`` (as ``DistributedSampler`` does), so every
    rank yields :meth:`__len__` keys. Call :meth:`set_epoch` before each epoch.

    Args:
        flags: ``(N, 4)`` class presence of the dataset's images, in dataset order.
        seed: the run's seed (the same on every rank).
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, flags: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.flags = np.asarray(flags).astype(bool).reshape(-1, len(CLASS_IDS))
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's image indices in ``0..N-1`` (before keys and the split across ranks)."""
        raise NotImplementedError

    def epoch_keys(self) -> np.ndarray:
        """``(L,)`` int64 keys of the whole epoch (every rank), padded to a multiple of ``num_replicas``."""
        n = len(self.flags)
        indices = np.asarray(self.epoch_indices(np.random.default_rng((self.seed, self.epoch, _SAMPLER_STREAM))))
        indices = indices.astype(np.int64)
        if len(indices) and len(indices) % self.num_replicas:
            pad = self.num_replicas - len(indices) % self.num_replicas
            indices = np.concatenate([indices, np.resize(indices, pad)])
        # repeat[j] = how often indices[j] occurs before position j
        order = np.argsort(indices, kind="stable")
        ranks = np.arange(len(indices))
        first = np.r_[True, indices[order][1:] != indices[order][:-1]] if len(indices) else np.zeros(0, bool)
        repeat = np.empty_like(indices)
        repeat[order] = ranks - np.maximum.accumulate(np.where(first, ranks, 0))
        return indices + repeat * n

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_keys()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        total = self._epoch_length()
        return -(-total // self.num_replicas)

    def _epoch_length(self) -> int:
        return len(self.flags)


class ShuffleSampler(EpochSampler):
    """A seeded permutation of the images per epoch."""

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.flags))


class BalancedSampler(EpochSampler):
    """Round-robin over the groups {clean, class 1, 2, 3, 4} (14th place).

    Each non-empty group (:func:`steelkit.augment.group_flags`; an image with several classes is in each of its
    groups) is shuffled once per epoch and cycled; the epoch takes one image from each group in turn until every
    clean image has been taken once: ``5 * (clean images)`` items when no group is empty. Without clean images, it
    runs until every image of the largest group has been taken once.
    """

    def _groups(self, rng: np.random.Generator | None) -> list[np.ndarray]:
        groups = group_flags(self.flags).T
        return [rng.permutation(np.flatnonzero(g)) if rng is not None else np.flatnonzero(g) for g in groups if g.any()]

    def _rounds(self) -> int:
        groups = group_flags(self.flags).sum(axis=0)
        return int(groups[0]) if groups[0] else int(groups.max(initial=0))

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        groups = self._groups(rng)
        rounds = np.arange(self._rounds())
        if not groups:
            return np.zeros(0, dtype=np.int64)
        return np.stack([g[rounds % len(g)] for g in groups], axis=1).reshape(-1)

    def _epoch_length(self) -> int:
        return self._rounds() * len(self._groups(None))


class WeightedSampler(EpochSampler):
    """``N`` images per epoch drawn with replacement; an image's weight is the mean over its groups (its classes,
    or the clean group) of ``1 / frequency`` of the group, so rare classes are drawn about as often as common ones."""

    def weights(self) -> np.ndarray:
        """``(N,)`` float64 probabilities of the images (they sum to 1)."""
        groups = group_flags(self.flags)
        inverse = 1.0 / np.maximum(group_frequencies(self.flags), 1e-12)
        weight = (groups * inverse).sum(axis=1) / groups.sum(axis=1)
        return weight / weight.sum()

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.flags)
        return rng.choice(n, size=n, replace=True, p=self.weights()) if n else np.zeros(0, dtype=np.int64)


#: samplers by ``DataConfig.sampler`` name
SAMPLERS: dict[str, type[EpochSampler]] = {
    "shuffle": ShuffleSampler,
    "balanced": BalancedSampler,
    "weighted": WeightedSampler,
}


def build_sampler(name: str, flags: np.ndarray, seed: int, num_replicas: int = 1, rank: int = 0) -> EpochSampler:
    """The training sampler of a config.

    Args:
        name: a name of :data:`SAMPLERS` (``DataConfig.sampler``).
        flags: ``(N, 4)`` class presence of the dataset's images, in dataset order.
        seed: the run's seed (the same on every rank).
        num_replicas, rank: DDP world size and this process's rank.

    Returns:
        A sampler of dataset keys; call ``set_epoch(epoch)`` before each epoch.

    Raises:
        KeyError: an unknown name (the message lists the valid names).
    """
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name](flags, seed, num_replicas, rank)


def folds_frame(image_ids: Sequence[str], folds: np.ndarray) -> pd.DataFrame:
    """The fold assignment file's content: ``ImageId, fold``."""
    return pd.DataFrame({IMAGE_ID: list(image_ids), "fold": np.asarray(folds, dtype=np.int64)})
