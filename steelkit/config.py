"""Training configuration: frozen dataclasses validated on construction. YAML is parsed here, at the edge, only.

A **recipe** (a preset under ``steelkit/presets/`` or any YAML file) trains one or more **jobs**; each job is one
model (segmenter or classifier) trained over the K folds through the same loop. A single-job recipe is a plain
config::

    name: cpu-tiny
    source: steelkit
    seed: 0
    model: {kind: segmenter, arch: unet, encoder: resnet18, head: sigmoid4}
    data: {scale: 0.25, crops: [[64, 256]], batch_size: 16, folds: 4}
    optim: {optimizer: adam, lr: 0.001, epochs: 10, schedule: cosine}
    loss: {terms: [{name: bce}, {name: dice}]}

A multi-job recipe puts shared sections under ``defaults`` and one mapping per model under ``jobs``; each job is
``defaults`` deep-merged with the job's own keys::

    name: bionda
    source: Bionda et al. ...
    defaults: {data: {...}, optim: {...}}
    jobs:
      - {name: seg-effb3, model: {arch: unet, encoder: efficientnet-b3}}
      - {name: gate-r50, model: {kind: classifier, arch: encoder, encoder: resnet50, head: binary}}

``overrides`` (``steelkit train --set optim.epochs=1``) are deep-merged into every job last.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .constants import CLASS_IDS

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS_DIR",
    "AveragingConfig",
    "DataConfig",
    "LossConfig",
    "LossStage",
    "LossTerm",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "TrainConfig",
    "deep_merge",
    "load_config",
    "load_recipe",
    "parse_overrides",
    "preset_names",
]

#: per-channel mean and std of ImageNet in [0, 1]; the grey image is repeated into 3 channels before normalising
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: folder of the shipped presets (one YAML per recipe)
PRESETS_DIR = Path(__file__).with_name("presets")

T = TypeVar("T")


def _tuples(value: Any) -> Any:
    """YAML lists to (nested) tuples, so frozen configs compare and hash by value."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**{k: _tuples(v) for k, v in values.items()})


def _choice(value: str, valid, where: str) -> None:
    if value not in valid:
        raise ValueError(f"{where} {value!r} is not one of {sorted(valid)}")


#: model kinds, and the heads valid for each
MODEL_HEADS = {"segmenter": ("sigmoid4", "softmax5"), "classifier": ("binary", "multilabel")}


@dataclass(frozen=True)
class ModelConfig:
    """One model.

    Attributes:
        kind: ``segmenter`` (masks) or ``classifier`` (image-level labels, used to gate masks).
        arch: segmenters: a name of :data:`steelkit.models.SEGMENTERS` (``unet``, ``fpn``, ``deeplabv3plus``, ...);
            classifiers: a name of :data:`steelkit.models.CLASSIFIERS` (``efficientnet`` = efficientnet-pytorch,
            ``encoder`` = any smp encoder with a global-pooling head).
        encoder: encoder name (``resnet34``, ``efficientnet-b3``, ``mobilenet_v2``, ``tu-<timm model>``, ...).
        encoder_weights: ``"imagenet"`` when the machine can load them (falls back to ``None`` with a warning when it
            cannot), ``None`` for random initialisation. Never fetched at inference: the kernel loads TorchScript.
        decoder_channels: Unet-style decoder widths; ``None`` = smp default.
        head: segmenters ``sigmoid4`` (one independent channel per class) or ``softmax5`` (background + 4 classes,
            turned into 4 per-class probabilities at inference); classifiers ``binary`` ("any defect", 1 output) or
            ``multilabel`` (one output per class).
        classes: the class ids the model predicts (``[3]`` = a per-class binary segmenter); ``softmax5`` needs all 4.
        aux_head: a segmenter with a classification head (smp ``aux_params``): outputs ``(masks, labels)``.
        aux_weight: weight of the classification head's BCE in the loss.
        dropout: dropout before the classification layer (classifiers and aux heads).
    """

    kind: str = "segmenter"
    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] | None = None
    head: str = "sigmoid4"
    classes: tuple[int, ...] = CLASS_IDS
    aux_head: bool = False
    aux_weight: float = 0.4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _choice(self.kind, MODEL_HEADS, "model.kind")
        _choice(self.head, MODEL_HEADS[self.kind], f"model.head of a {self.kind}")
        if self.encoder_weights not in (None, "imagenet"):
            raise ValueError(f"model.encoder_weights must be null or 'imagenet', got {self.encoder_weights!r}")
        if (
            not self.classes
            or sorted(set(self.classes)) != list(self.classes)
            or not set(self.classes) <= set(CLASS_IDS)
        ):
            raise ValueError(
                f"model.classes must be sorted, distinct class ids from {list(CLASS_IDS)}, got {self.classes}"
            )
        if self.head == "softmax5" and tuple(self.classes) != CLASS_IDS:
            raise ValueError("model.head softmax5 predicts all 4 classes: model.classes must be [1, 2, 3, 4]")
        if self.aux_head and self.kind != "segmenter":
            raise ValueError("model.aux_head adds a classification head to a segmenter; this model is a classifier")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def outputs(self) -> int:
        """Channels of the mask logits (segmenters) or label logits (classifiers)."""
        if self.head == "softmax5":
            return len(CLASS_IDS) + 1
        if self.head == "binary":
            return 1
        return len(self.classes)


#: batch samplers by name
SAMPLERS = ("shuffle", "balanced", "weighted")


@dataclass(frozen=True)
class DataConfig:
    """Data during training.

    Attributes:
        scale: training resolution as a fraction of the full image (0.5 = train at 128x800, predict at full size).
        crops: ``[[h, w], ...]`` random crops at training resolution; epoch ``e`` uses ``crops[e % len(crops)]``
            (Bionda alternates 256x384 and 256x512); ``None`` = the whole (scaled) image.
        crop_on_mask: probability that a crop is centred on a random defect pixel of a defective image.
        dark_level: grey level below which a pixel counts as dark (off the steel sheet); 0 = no dark-crop rejection.
        max_dark_fraction: a random crop with more dark pixels than this is redrawn (up to 10 tries, then the
            least dark one is kept).
        full_size_epochs: the last N epochs train on the whole (scaled) image, no crop (full-size fine-tuning).
        sampler: ``shuffle``; ``balanced`` (deterministic cycling over {clean, class 1, 2, 3, 4} until every clean
            image is seen once per epoch, 14th place); ``weighted`` (random, by inverse class frequency).
        augment: albumentations pipeline as ``{name: probability}`` or ``{name: {p: ..., param: ...}}``; names from
            :data:`steelkit.augment.AUGMENTATIONS` (flips, brightness_contrast, gamma, shift_scale_rotate, noise,
            coarse_dropout, defect_blackout, ...).
        class_weighted_augment: apply the photometric/geometric augmentations of an image with probability
            ``1 - frequency`` of its rarest class (Nie et al.): a gate before the pipeline, so each gated transform
            fires with ``gate x p`` (``p: 1`` gives the paper's behaviour); flips and defect blackout are never gated.
        batch_size, num_workers: DataLoader settings (``batch_size`` per optimiser micro-step).
        folds: K of the K-fold split, stratified by class combination.
        train_folds: which folds to train (``None`` = all K).
        mean, std: per-channel normalisation applied to ``image / 255``.
    """

    scale: float = 1.0
    crops: tuple[tuple[int, int], ...] | None = None
    crop_on_mask: float = 0.0
    dark_level: int = 0
    max_dark_fraction: float = 0.5
    full_size_epochs: int = 0
    sampler: str = "shuffle"
    augment: Mapping[str, Any] = field(default_factory=lambda: {"hflip": 0.5, "vflip": 0.5})
    class_weighted_augment: bool = False
    batch_size: int = 8
    num_workers: int = 2
    folds: int = 5
    train_folds: tuple[int, ...] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"data.scale must be in (0, 1], got {self.scale}")
        if self.crops is not None and (
            not self.crops or not all(len(c) == 2 and all(int(v) > 0 for v in c) for c in self.crops)
        ):
            raise ValueError(f"data.crops must be a list of [height, width] pairs, got {self.crops}")
        if not 0 <= self.crop_on_mask <= 1:
            raise ValueError(f"data.crop_on_mask must be in [0, 1], got {self.crop_on_mask}")
        if not 0 <= self.dark_level <= 255 or not 0 < self.max_dark_fraction <= 1:
            raise ValueError("data.dark_level must be in [0, 255] and data.max_dark_fraction in (0, 1]")
        if self.full_size_epochs < 0:
            raise ValueError(f"data.full_size_epochs must be >= 0, got {self.full_size_epochs}")
        _choice(self.sampler, SAMPLERS, "data.sampler")
        if self.folds < 2:
            raise ValueError(f"data.folds must be >= 2, got {self.folds}")
        if self.train_folds is not None and not all(0 <= f < self.folds for f in self.train_folds):
            raise ValueError(f"data.train_folds {self.train_folds} must lie in 0..{self.folds - 1}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("data.mean and data.std need 3 values (the grey image is fed as 3 channels)")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")
        from .augment import validate_augment  # the registry lives with the builders

        validate_augment(self.augment)

    @property
    def fold_ids(self) -> tuple[int, ...]:
        return tuple(range(self.folds)) if self.train_folds is None else tuple(self.train_folds)

    def crop_for_epoch(self, epoch: int, epochs: int) -> tuple[int, int] | None:
        """The crop ``(h, w)`` of an epoch, or ``None`` for whole images (no crops, or a full-size epoch)."""
        if self.crops is None or epoch >= epochs - self.full_size_epochs:
            return None
        h, w = self.crops[epoch % len(self.crops)]
        return int(h), int(w)


#: optimisers and learning-rate schedules by name (built in steelkit.train)
OPTIMIZERS = ("adam", "adamw", "sgd", "radam")
SCHEDULES = ("constant", "cosine", "plateau")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and loop control.

    Attributes:
        optimizer: ``adam``, ``adamw``, ``sgd`` (with ``momentum``) or ``radam``.
        epochs: passes over the training folds; ``steps_per_epoch`` caps the batches of an epoch.
        schedule: ``constant``; ``cosine`` (per optimiser step, from ``lr`` after ``warmup_steps`` linear warm-up
            steps down to ``lr * min_lr_ratio``); ``plateau`` (ReduceLROnPlateau on validation Dice, ``plateau_factor``
            after ``plateau_patience`` epochs without improvement; warm-up applies too).
        accumulate: micro-batches per optimiser step (gradient accumulation: effective batch =
            ``batch_size * accumulate``).
        early_stopping: stop a fold after this many epochs without a better validation Dice; ``None`` = never.
        top_k: checkpoints kept per fold, best validation Dice first (``fold{k}/top{i}.pt``; ``best.pt`` is the best).
        amp: float16 autocast and gradient scaling on CUDA (ignored on CPU).
        grad_clip: clip the gradient norm to this; ``None`` = no clipping.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 10
    steps_per_epoch: int | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    accumulate: int = 1
    early_stopping: int | None = None
    top_k: int = 1
    amp: bool = True
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"optim.epochs must be >= 1 and optim.lr > 0, got {self.epochs}, {self.lr}")
        _choice(self.optimizer, OPTIMIZERS, "optim.optimizer")
        _choice(self.schedule, SCHEDULES, "optim.schedule")
        if self.accumulate < 1 or self.top_k < 1:
            raise ValueError(f"optim.accumulate and optim.top_k must be >= 1, got {self.accumulate}, {self.top_k}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"optim.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ValueError(f"optim.early_stopping must be >= 1 epochs, got {self.early_stopping}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"optim.plateau_factor must be in (0, 1), got {self.plateau_factor}")


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a loss; the parameters a term does not use are ignored.

    Attributes:
        name: a name of :data:`steelkit.losses.LOSSES` (``bce``, ``dice``, ``tversky``, ``focal``, ``lovasz``,
            ``cce``, ``softmax_dice``).
        weight: multiplier of the term.
        pos_weight: ``bce``: weight of positive pixels per class.
        alpha: ``tversky``: weight of false positives (false negatives get ``1 - alpha``).
        gamma: ``focal``: focusing exponent.
        class_weights: ``dice``, ``cce``, ``softmax_dice``: weight per class (hse: 2, 2.5, 1, 2).
    """

    name: str
    weight: float = 1.0
    pos_weight: tuple[float, ...] | None = None
    alpha: float = 0.5
    gamma: float = 2.0
    class_weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LossStage:
    """The loss from epoch ``start_epoch`` on (until the next stage's start)."""

    terms: tuple[LossTerm, ...]
    start_epoch: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> LossStage:
        values = dict(values)
        terms = values.pop("terms", None)
        if not terms:
            raise ValueError(f"{where}: a loss stage needs 'terms', e.g. [{{name: bce}}, {{name: dice}}]")
        built = tuple(
            t if isinstance(t, LossTerm) else _build(LossTerm, t, f"{where} term {i}") for i, t in enumerate(terms)
        )
        return _build(cls, {**values, "terms": built}, where)


@dataclass(frozen=True)
class LossConfig:
    """A loss schedule: ``stages`` sorted by ``start_epoch``, the first starting at 0.

    YAML: ``{terms: [...]}`` (one stage) or ``{stages: [{start_epoch: 0, terms: [...]}, {start_epoch: 70, ...}]}``.
    """

    stages: tuple[LossStage, ...] = (LossStage((LossTerm("bce"), LossTerm("dice"))),)

    def __post_init__(self) -> None:
        starts = [s.start_epoch for s in self.stages]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"loss stages must start at epoch 0 and increase, got start epochs {starts}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LossConfig:
        values = dict(values or {})
        if not values:
            return cls()
        if "terms" in values:
            values = {"stages": [values]}
        unknown = sorted(set(values) - {"stages"})
        if unknown:
            raise KeyError(f"config section 'loss': unknown key(s) {unknown}; valid keys: ['stages', 'terms']")
        stages = tuple(
            s if isinstance(s, LossStage) else LossStage.from_dict(s, f"loss stage {i}")
            for i, s in enumerate(values["stages"])
        )
        return cls(stages=stages)

    def stage_at(self, epoch: int) -> int:
        """Index of the stage in force at ``epoch``."""
        return max(i for i, s in enumerate(self.stages) if s.start_epoch <= epoch)


@dataclass(frozen=True)
class AveragingConfig:
    """Checkpoint weight averaging at the end of each fold (12th place).

    Attributes:
        greedy: average the best subset of the fold's ``top_k`` checkpoints, chosen greedily by validation Dice;
            the result is ``fold{k}/averaged.pt`` and is what gets exported.
        recalibrate_bn: recompute BatchNorm statistics of the average on ``bn_batches`` training batches.
    """

    greedy: bool = False
    recalibrate_bn: bool = False
    bn_batches: int = 20


@dataclass(frozen=True)
class TrainConfig:
    """One job: a model trained over the folds. Every checkpoint stores ``to_dict()`` so any file explains itself."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)

    def __post_init__(self) -> None:
        from .losses import check_loss  # the registry of losses lives with them

        for i, stage in enumerate(self.loss.stages):
            for term in stage.terms:
                check_loss(term, self.model, f"loss stage {i}")
        if self.averaging.greedy and self.optim.top_k < 2:
            raise ValueError("averaging.greedy averages a fold's top-k checkpoints: set optim.top_k >= 2")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        values = dict(values)
        sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "averaging": AveragingConfig}
        for key, sub in sections.items():
            if not isinstance(values.get(key), sub):
                values[key] = _build(sub, values.get(key), f"config section {key!r}")
        if not isinstance(values.get("loss"), LossConfig):
            values["loss"] = LossConfig.from_dict(values.get("loss"))
        return _build(cls, values, "config")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"]["augment"] = copy.deepcopy(dict(self.data.augment))
        return out


@dataclass(frozen=True)
class Recipe:
    """A preset: the jobs it trains and where the recipe comes from."""

    name: str
    jobs: tuple[TrainConfig, ...]
    source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        names = [job.name for job in self.jobs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name!r}: jobs need distinct names, got {names}")

    def job(self, name: str) -> TrainConfig:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(f"recipe {self.name!r} has no job {name!r}; jobs: {[j.name for j in self.jobs]}")


#: sections a job or an override replaces whole instead of merging into (a loss or a pipeline is one thing)
REPLACED_KEYS = ("loss", "augment")


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, recursively for mappings (lists, scalars and :data:`REPLACED_KEYS` are
    replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in REPLACED_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["optim.epochs=1", "data.crops=[[32,64]]"]`` to a nested mapping; values are parsed as YAML.

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        node = out
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return out


def preset_names() -> tuple[str, ...]:
    """Names of the shipped presets."""
    return tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))


def _read_yaml(source: str | Path) -> tuple[Path, dict[str, Any]]:
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
    return path, values


def recipe_from_dict(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, where: str = "config"):
    """Build a :class:`Recipe` from a parsed YAML mapping (see the module docstring)."""
    values = dict(values)
    name = values.pop("name", "run")
    source = values.pop("source", "")
    description = values.pop("description", "")
    overrides = dict(overrides or {})
    if "jobs" in values:
        defaults = values.pop("defaults", {}) or {}
        jobs_raw = values.pop("jobs")
        if values:
            raise KeyError(
                f"{where}: unknown top-level key(s) {sorted(values)} beside 'jobs'; put them under 'defaults'"
            )
        if not isinstance(jobs_raw, list) or not jobs_raw:
            raise ValueError(f"{where}: 'jobs' must be a non-empty list")
        jobs = []
        for i, job in enumerate(jobs_raw):
            merged = deep_merge(deep_merge(defaults, job), overrides)
            merged.setdefault("name", f"{name}-{i}")
            jobs.append(_job(merged, f"{where} job {merged['name']!r}"))
    else:
        merged = deep_merge({**values, "name": name}, overrides)
        jobs = [_job(merged, where)]
    return Recipe(name=name, jobs=tuple(jobs), source=source, description=description)


def _job(values: Mapping[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.from_dict(values)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{where}: {err.args[0] if err.args else err}") from None


def load_recipe(source: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a preset name, with optional overrides merged into every job.

    Raises:
        KeyError: neither an existing file nor a preset (the message lists the presets); unknown keys or names.
        ValueError: invalid values (the message names the job and the key).
    """
    path, values = _read_yaml(source)
    return recipe_from_dict(values, overrides, where=str(path))


def load_config(source: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The single job of a one-job recipe (a plain config).

    Raises:
        ValueError: the recipe has several jobs (use :func:`load_recipe`).
    """
    recipe = load_recipe(source, overrides)
    if len(recipe.jobs) != 1:
        raise ValueError(f"{source}: recipe has {len(recipe.jobs)} jobs; use load_recipe")
    return recipe.jobs[0]
