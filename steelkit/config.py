"""Training configuration: frozen dataclasses validated on construction. YAML is parsed here, at the edge, only.

A config is a YAML file (or a preset name, see :func:`preset_names`) with four sections::

    name: cpu-tiny
    seed: 0
    model: {arch: unet, encoder: tu-test_efficientnet, encoder_weights: null}
    data: {scale: 0.5, crop_width: 256, batch_size: 16, folds: 2}
    optim: {lr: 0.003, epochs: 6}
    loss: {bce_weight: 1.0, dice_weight: 1.0}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS_DIR",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "preset_names",
]

#: per-channel mean and std of ImageNet in [0, 1]; the grey image is repeated into 3 channels before normalising
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: folder of the shipped presets (one YAML per recipe)
PRESETS_DIR = Path(__file__).with_name("presets")

T = TypeVar("T")


def _build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """A segmentation-models-pytorch segmenter.

    Attributes:
        arch: architecture name from :data:`steelkit.models.ARCHITECTURES`.
        encoder: any smp encoder name (``resnet18``, ``efficientnet-b3``, ``tu-<timm model>``, ...).
        encoder_weights: ``"imagenet"`` when the machine can load them, else ``None`` (never fetched at inference).
        decoder_channels: Unet-style decoder widths; ``None`` = smp default.
        activation: output head; ``"sigmoid"`` = 4 independent per-class channels.
    """

    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.activation != "sigmoid":
            raise ValueError(f"model.activation {self.activation!r} is not supported; valid: ['sigmoid']")
        if self.encoder_weights not in (None, "imagenet"):
            raise ValueError(f"model.encoder_weights must be null or 'imagenet', got {self.encoder_weights!r}")


@dataclass(frozen=True)
class DataConfig:
    """Data during training.

    Attributes:
        scale: training resolution as a fraction of the full image (0.5 = train at 128x800, predict at full size).
        crop_height, crop_width: random crop at training resolution; ``None`` = the whole (scaled) image.
        crop_on_mask: probability that a crop is centred on a random defect pixel of a defective image.
        batch_size, num_workers: DataLoader settings.
        folds: K of the K-fold split, stratified by class combination.
        train_folds: which folds to train (``None`` = all K).
        hflip, vflip: flip probabilities (albumentations).
        mean, std: per-channel normalisation applied to ``image / 255``.
    """

    scale: float = 1.0
    crop_height: int | None = None
    crop_width: int | None = None
    crop_on_mask: float = 0.0
    batch_size: int = 8
    num_workers: int = 2
    folds: int = 5
    train_folds: tuple[int, ...] | None = None
    hflip: float = 0.5
    vflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"data.scale must be in (0, 1], got {self.scale}")
        if not 0 <= self.crop_on_mask <= 1:
            raise ValueError(f"data.crop_on_mask must be in [0, 1], got {self.crop_on_mask}")
        if self.folds < 2:
            raise ValueError(f"data.folds must be >= 2, got {self.folds}")
        if self.train_folds is not None and not all(0 <= f < self.folds for f in self.train_folds):
            raise ValueError(f"data.train_folds {self.train_folds} must lie in 0..{self.folds - 1}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("data.mean and data.std need 3 values (the grey image is fed as 3 channels)")

    @property
    def fold_ids(self) -> tuple[int, ...]:
        return tuple(range(self.folds)) if self.train_folds is None else tuple(self.train_folds)


#: learning-rate schedules by name
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """Adam for ``epochs`` passes, optionally capped at ``steps_per_epoch`` batches.

    Attributes:
        schedule: ``constant`` or ``cosine`` (per step, from ``lr`` after ``warmup_steps`` linear warm-up steps down to
            ``lr * min_lr_ratio`` at the last step).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    steps_per_epoch: int | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"optim.epochs must be >= 1 and optim.lr > 0, got {self.epochs}, {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")


@dataclass(frozen=True)
class LossConfig:
    """``bce_weight * BCE + dice_weight * soft Dice`` over the 4 sigmoid channels."""

    bce_weight: float = 1.0
    dice_weight: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. Every checkpoint stores ``to_dict()`` so any file explains itself."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        values = dict(values)
        sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "loss": LossConfig}
        for key, sub in sections.items():
            values[key] = _build(sub, values.get(key), f"config section {key!r}")
        return _build(cls, values, "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> tuple[str, ...]:
    """Names of the shipped presets."""
    return tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))


def load_config(source: str | Path) -> TrainConfig:
    """Load a config from a YAML path or a preset name.

    Raises:
        KeyError: neither an existing file nor a preset; the message lists the presets.
    """
    import yaml

    path = Path(source)
    if not path.is_file():
        path = PRESETS_DIR / f"{source}.yaml"
        if not path.is_file():
            raise KeyError(f"config {str(source)!r} is neither a file nor a preset; presets: {list(preset_names())}")
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return TrainConfig.from_dict(values)
