"""Training losses: pure functions of tensors, one registry of them, and thin modules that weight and schedule them.

Every loss takes ``(logits, target, **params)`` and returns a float32 scalar, even under autocast. Model heads
(:data:`steelkit.config.MODEL_HEADS`) decide which losses fit:

* ``sigmoid4`` segmenters: logits ``(N, C, H, W)``, one independent sigmoid channel per class of ``model.classes``;
  target ``(N, C, H, W)`` {0, 1}.
* ``softmax5`` segmenters: logits ``(N, 5, H, W)``, channel 0 = background, channels 1..4 = classes 1..4; target
  ``(N, 4, H, W)`` {0, 1} one-hot of the 4 classes (a pixel with no class on is background; classes never overlap).
* ``binary`` / ``multilabel`` classifiers: logits and target ``(N, L)`` (``L`` = 1 or ``len(model.classes)``).

Configs name losses by strings of :data:`LOSSES`; :func:`check_loss` validates a :class:`~steelkit.config.LossTerm`
against the model it trains, :func:`build_loss` turns a :class:`~steelkit.config.LossConfig` into a
:class:`LossSchedule` of :class:`WeightedLoss` modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .constants import NUM_CLASSES

if TYPE_CHECKING:  # steelkit.config imports this module inside TrainConfig.__post_init__: no import at run time
    from .config import LossConfig, LossTerm, ModelConfig

__all__ = [
    "LOSSES",
    "LOSS_HEADS",
    "LOSS_PARAMS",
    "BCEDiceLoss",
    "LossSchedule",
    "WeightedLoss",
    "bce_dice_loss",
    "bce_loss",
    "build_loss",
    "cce_loss",
    "check_loss",
    "focal_loss",
    "losses_for_head",
    "lovasz_hinge_loss",
    "soft_dice_loss",
    "softmax_dice_loss",
    "softmax_to_classes",
    "tversky_loss",
]

LossFn = TypeVar("LossFn", bound=Callable[..., torch.Tensor])


def _float32(fn: LossFn) -> LossFn:
    """Run ``fn(logits, target, ...)`` on float32 copies of both tensors with autocast disabled."""

    @functools.wraps(fn)
    def wrapper(logits: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return fn(logits.float(), target.float(), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """All dimensions but the channel dimension 1: ``(0, 2, 3)`` for ``(N, C, H, W)``."""
    return (0, *range(2, x.ndim))


def _per_channel(values: Sequence[float], channels: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` as a float32 tensor of shape ``(channels,)`` on the device of ``like``.

    Raises:
        ValueError: ``len(values) != channels``.
    """
    if len(values) != channels:
        raise ValueError(f"{what} needs {channels} values (one per channel), got {len(values)}: {list(values)}")
    return torch.as_tensor(values, dtype=torch.float32, device=like.device)


def _present_mean(
    loss: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """(Weighted) mean of the per-class ``loss`` ``(C,)`` over the classes with a positive pixel in ``target``.

    Returns a zero that keeps the graph (so ``backward()`` works) when no class is present.
    """
    present = target.sum(_reduce_dims(target)) > 0
    if not present.any():
        return loss.sum() * 0.0
    if class_weights is None:
        return loss[present].mean()
    weights = _per_channel(class_weights, loss.shape[0], loss, "class_weights")[present]
    return (loss[present] * weights).sum() / weights.sum()


def _dice_of_probs(
    prob: torch.Tensor, target: torch.Tensor, eps: float, class_weights: Sequence[float] | None
) -> torch.Tensor:
    """``1 - soft Dice`` per class pooled over the batch, averaged over the present classes; see soft_dice_loss."""
    dims = _reduce_dims(prob)
    inter = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    loss = 1.0 - (2.0 * inter + eps) / (total + eps)
    return _present_mean(loss, target, class_weights)


@_float32
def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: Sequence[float] | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over all elements.

    Args:
        logits: ``(N, C, ...)`` raw scores: ``(N, C, H, W)`` masks or ``(N, C)`` classifier labels.
        target: same shape, {0, 1}.
        pos_weight: ``C`` multipliers of the positive term per channel (dimension 1, not the last dimension as
            :func:`torch.nn.functional.binary_cross_entropy_with_logits` would broadcast it); ``None`` = 1.
    """
    weight = None
    if pos_weight is not None:
        weight = _per_channel(pos_weight, logits.shape[1], logits, "bce pos_weight")
        weight = weight.view(-1, *([1] * (logits.ndim - 2)))
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


@_float32
def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, class_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``1 - soft Dice`` per class over the whole batch, averaged over the classes present in the batch.

    Per class ``c``: ``1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)`` with ``p = sigmoid(logits)``, sums over
    all images and pixels (as smp's ``DiceLoss``), so a crop without defects does not reward predicting nothing. A
    class with no positive pixel in the batch is left out of the mean (BCE still covers it); with no class present
    the result is a zero that still has a gradient.

    Args:
        logits: ``(N, C, H, W)`` raw scores.
        target: ``(N, C, H, W)`` {0, 1}.
        eps: smoothing added to numerator and denominator.
        class_weights: ``C`` weights: the mean over present classes becomes ``sum(w * loss) / sum(w)``.
    """
    return _dice_of_probs(torch.sigmoid(logits), target, eps, class_weights)


@_float32
def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, eps: float = 1.0) -> torch.Tensor:
    """Soft Tversky loss per class over the whole batch, averaged over the classes present in the batch.

    Per class: ``1 - (TP + eps) / (TP + alpha * FP + (1 - alpha) * FN + eps)`` with soft counts ``TP = sum(p * t)``,
    ``FP = sum(p * (1 - t))``, ``FN = sum((1 - p) * t)`` over all images and pixels. ``alpha`` weighs false positives
    and ``1 - alpha`` false negatives: ``alpha = 0.3`` favours recall (Bionda et al.'s fine-tuning stage),
    ``alpha = 0.5`` is the soft Dice loss with smoothing ``2 * eps``. Absent classes are handled as in
    :func:`soft_dice_loss`.

    Args:
        logits: ``(N, C, H, W)`` raw scores.
        target: ``(N, C, H, W)`` {0, 1}.
        alpha: weight of false positives, in ``(0, 1)``.
        eps: smoothing added to numerator and denominator.
    """
    prob = torch.sigmoid(logits)
    dims = _reduce_dims(prob)
    tp = (prob * target).sum(dims)
    fp = (prob * (1.0 - target)).sum(dims)
    fn = ((1.0 - prob) * target).sum(dims)
    loss = 1.0 - (tp + eps) / (tp + alpha * fp + (1.0 - alpha) * fn + eps)
    return _present_mean(loss, target)


@_float32
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss ``-(1 - p_t) ** gamma * log(p_t)``, mean over all elements (``gamma = 0`` is BCE).

    ``p_t`` is ``sigmoid(logits)`` where the target is 1 and ``1 - sigmoid(logits)`` where it is 0.

    Args:
        logits: ``(N, C, ...)`` raw scores (masks or classifier labels).
        target: same shape, {0, 1}.
        gamma: focusing exponent, ``>= 0``.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log(p_t)
    return ((-torch.expm1(-bce)) ** gamma * bce).mean()  # 1 - p_t = 1 - exp(-bce), computed without cancellation


def _lovasz_hinge_maps(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of each row of ``(M, P)`` flattened maps: ``(M,)``.

    Errors ``1 - logit * sign`` (sign = +1 for positives, -1 for negatives) are sorted in decreasing order and
    weighted by the increments of the Jaccard loss as the sorted pixels are mispredicted one after the other.
    """
    errors = 1.0 - logits * (2.0 * target - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(target, 1, order)
    positives = gt_sorted.sum(1, keepdim=True)
    intersection = positives - gt_sorted.cumsum(1)
    union = positives + (1.0 - gt_sorted).cumsum(1)  # >= 1 from the first pixel on
    jaccard = 1.0 - intersection / union
    increments = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * increments).sum(1)


@_float32
def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Lovasz hinge loss (Berman et al. 2018) per image and per class, averaged over the ``N * C`` maps.

    A map whose logits all have the right sign with a margin (``|logit| >= 1``) scores 0. ``symmetric`` averages
    the loss of the map and of its complement, ``(L(x, t) + L(-x, 1 - t)) / 2`` (the "symmetric Lovasz" of several
    Severstal solutions), so empty maps are scored by the Jaccard of the background too.

    Args:
        logits: ``(N, C, H, W)`` raw scores.
        target: ``(N, C, H, W)`` {0, 1}.
        symmetric: average with the loss of the complement.
    """
    flat_logits = logits.reshape(logits.shape[0] * logits.shape[1], -1)
    flat_target = target.reshape(flat_logits.shape)
    loss = _lovasz_hinge_maps(flat_logits, flat_target)
    if symmetric:
        loss = 0.5 * (loss + _lovasz_hinge_maps(-flat_logits, 1.0 - flat_target))
    return loss.mean()


def _class_index(target4: torch.Tensor) -> torch.Tensor:
    """``(N, 4, H, W)`` {0, 1} one-hot classes to ``(N, H, W)`` int64 indices, 0 = background, 1..4 = classes."""
    return torch.where(target4.sum(1) > 0, target4.argmax(1) + 1, 0)


@_float32
def cce_loss(
    logits5: torch.Tensor, target4: torch.Tensor, class_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Categorical cross-entropy of a ``softmax5`` head, mean over pixels.

    Args:
        logits5: ``(N, 5, H, W)`` raw scores, channel 0 = background, channel ``c`` = class ``c``.
        target4: ``(N, 4, H, W)`` {0, 1} one-hot of classes 1..4 (no class on = background).
        class_weights: 4 weights of classes 1..4 (background weight 1); the mean becomes the weighted mean
            ``sum(w[y] * -log p[y]) / sum(w[y])`` over pixels with true index ``y`` (PyTorch's convention).
    """
    weight = None
    if class_weights is not None:
        weight = torch.cat(
            [logits5.new_ones(1), _per_channel(class_weights, NUM_CLASSES, logits5, "cce class_weights")]
        )
    return F.cross_entropy(logits5, _class_index(target4), weight=weight)


@_float32
def softmax_dice_loss(
    logits5: torch.Tensor, target4: torch.Tensor, class_weights: Sequence[float] | None = None, eps: float = 1.0
) -> torch.Tensor:
    """``1 - soft Dice`` of a ``softmax5`` head: :func:`soft_dice_loss` on the probabilities of channels 1..4.

    Args:
        logits5: ``(N, 5, H, W)`` raw scores, channel 0 = background.
        target4: ``(N, 4, H, W)`` {0, 1} one-hot of classes 1..4.
        class_weights: 4 weights of classes 1..4 (weighted mean over the present classes).
        eps: smoothing added to numerator and denominator.
    """
    return _dice_of_probs(torch.softmax(logits5, dim=1)[:, 1:], target4, eps, class_weights)


def softmax_to_classes(logits5: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities of a ``softmax5`` head, for validation and inference.

    Args:
        logits5: ``(N, 5, H, W)`` raw scores, channel 0 = background.

    Returns:
        ``(N, 4, H, W)`` float32 softmax probabilities of classes 1..4 (they sum to ``1 - p(background)``).
    """
    with torch.autocast(device_type=logits5.device.type, enabled=False):
        return torch.softmax(logits5.float(), dim=1)[:, 1:]


#: losses by config name; each is ``fn(logits, target, **params) -> float32 scalar``
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "bce": bce_loss,
    "dice": soft_dice_loss,
    "tversky": tversky_loss,
    "focal": focal_loss,
    "lovasz": lovasz_hinge_loss,
    "cce": cce_loss,
    "softmax_dice": softmax_dice_loss,
}
#: model heads (``model.head``) each loss applies to
LOSS_HEADS: dict[str, tuple[str, ...]] = {
    "bce": ("sigmoid4", "binary", "multilabel"),
    "dice": ("sigmoid4",),
    "tversky": ("sigmoid4",),
    "focal": ("sigmoid4", "binary", "multilabel"),
    "lovasz": ("sigmoid4",),
    "cce": ("softmax5",),
    "softmax_dice": ("softmax5",),
}
#: the :class:`~steelkit.config.LossTerm` fields each loss takes as keyword arguments (other fields are ignored)
LOSS_PARAMS: dict[str, tuple[str, ...]] = {
    "bce": ("pos_weight",),
    "dice": ("class_weights",),
    "tversky": ("alpha",),
    "focal": ("gamma",),
    "lovasz": (),
    "cce": ("class_weights",),
    "softmax_dice": ("class_weights",),
}


def _loss_fn(name: str) -> Callable[..., torch.Tensor]:
    """``LOSSES[name]``; raises a KeyError listing the valid names."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    return LOSSES[name]


def losses_for_head(head: str) -> tuple[str, ...]:
    """Names of the losses that fit a model head (``sigmoid4``, ``softmax5``, ``binary``, ``multilabel``)."""
    return tuple(name for name, heads in LOSS_HEADS.items() if head in heads)


def check_loss(term: LossTerm, model: ModelConfig, where: str) -> None:
    """Validate one loss term against the model it trains; called by ``TrainConfig`` on construction.

    Only the parameters the loss uses (:data:`LOSS_PARAMS`) are checked. ``pos_weight`` needs one value per output
    channel (``len(model.classes)`` for ``sigmoid4`` and ``multilabel``, 1 for ``binary``), ``class_weights`` one per
    class of ``model.classes`` (4 for ``softmax5``).

    Raises:
        KeyError: unknown ``term.name`` (the message lists the valid names).
        ValueError: the loss does not fit ``model.head`` (the message lists the losses that do), or a parameter is out
            of range or has the wrong length.
    """
    try:
        _loss_fn(term.name)
    except KeyError as err:
        raise KeyError(f"{where}: {err.args[0]}") from None
    label = f"{where}: loss term {term.name!r}"
    if model.head not in LOSS_HEADS[term.name]:
        valid = list(losses_for_head(model.head))
        raise ValueError(f"{label} does not fit a {model.head} head; valid losses for {model.head}: {valid}")
    if not term.weight >= 0:
        raise ValueError(f"{label}: weight must be >= 0, got {term.weight}")
    params = LOSS_PARAMS[term.name]
    lengths = {"pos_weight": model.outputs, "class_weights": len(model.classes)}
    for key, length in lengths.items():
        values = getattr(term, key)
        if key not in params or values is None:
            continue
        if len(values) != length:
            raise ValueError(
                f"{label}: {key} needs {length} values for a {model.head} head with classes {list(model.classes)}, "
                f"got {len(values)}: {list(values)}"
            )
        if not all(v > 0 for v in values):
            raise ValueError(f"{label}: {key} must be > 0, got {list(values)}")
    if "alpha" in params and not 0 < term.alpha < 1:
        raise ValueError(f"{label}: alpha (weight of false positives) must be in (0, 1), got {term.alpha}")
    if "gamma" in params and not term.gamma >= 0:
        raise ValueError(f"{label}: gamma must be >= 0, got {term.gamma}")


class WeightedLoss(nn.Module):
    """``sum(term.weight * LOSSES[term.name](logits, target, **params))`` over loss terms.

    Attributes:
        terms: the :class:`~steelkit.config.LossTerm` objects, in order (for logging).
        names: one key per term for :meth:`terms_breakdown`: the loss name, suffixed ``_<index>`` when repeated.
    """

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a WeightedLoss needs at least one term")
        self.terms = tuple(terms)
        self._fns = [_loss_fn(t.name) for t in self.terms]
        self._kwargs = [{p: getattr(t, p) for p in LOSS_PARAMS[t.name]} for t in self.terms]
        counts = [t.name for t in self.terms]
        self.names = tuple(t.name if counts.count(t.name) == 1 else f"{t.name}_{i}" for i, t in enumerate(self.terms))

    def _values(self, logits: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        return [fn(logits, target, **kwargs) for fn, kwargs in zip(self._fns, self._kwargs)]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the terms: a float32 scalar. Shapes as the head's losses (see the module docstring)."""
        values = self._values(logits, target)
        total = self.terms[0].weight * values[0]
        for term, value in zip(self.terms[1:], values[1:]):
            total = total + term.weight * value
        return total

    @torch.no_grad()
    def terms_breakdown(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Each term's unweighted value, keyed by :attr:`names` (for metrics logs)."""
        return {name: float(value) for name, value in zip(self.names, self._values(logits, target))}

    def extra_repr(self) -> str:
        return ", ".join(f"{t.weight:g}*{name}" for t, name in zip(self.terms, self.names))


class LossSchedule:
    """The loss of each epoch: one :class:`WeightedLoss` per stage of a :class:`~steelkit.config.LossConfig`.

    Attributes:
        config: the loss config.
        stages: one :class:`WeightedLoss` per stage, in order.
    """

    def __init__(self, config: LossConfig) -> None:
        self.config = config
        self.stages = tuple(WeightedLoss(stage.terms) for stage in config.stages)

    def stage_index(self, epoch: int) -> int:
        """Index of the stage in force at 0-based ``epoch``: the latest whose ``start_epoch <= epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self.config.stage_at(epoch)

    def at(self, epoch: int) -> WeightedLoss:
        """The loss in force at 0-based ``epoch``."""
        return self.stages[self.stage_index(epoch)]

    def __len__(self) -> int:
        return len(self.stages)


def build_loss(cfg: LossConfig, model: ModelConfig | None = None) -> LossSchedule:
    """The :class:`LossSchedule` of a loss config, each term checked against ``model`` when given."""
    if model is not None:
        for i, stage in enumerate(cfg.stages):
            for term in stage.terms:
                check_loss(term, model, f"loss stage {i}")
    return LossSchedule(cfg)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> torch.Tensor:
    """``bce_weight * BCE-with-logits + dice_weight * soft Dice loss``; shapes as in :func:`soft_dice_loss`."""
    return bce_weight * bce_loss(logits, target) + dice_weight * soft_dice_loss(logits, target)


class BCEDiceLoss(nn.Module):
    """Module form of :func:`bce_dice_loss` (kept for callers that predate :class:`WeightedLoss`)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_dice_loss(logits, target, self.bce_weight, self.dice_weight)
