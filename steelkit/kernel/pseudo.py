"""Pseudo-label rounds: pick confident test images, fine-tune the scripted fold models on training images plus the
pseudo-labelled test images, keep the round only when the out-of-fold Dice does not drop.

Selection (:func:`select_confident`) is a pure numpy function of cached per-image statistics; fine-tuning
(:func:`finetune`) trains a loaded TorchScript model in place (scripted, not traced, so BatchNorm follows
``.train()``), with flips as augmentation, and returns weight snapshots for the averaging stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..averaging import cpu_state_dict
from ..images import resize_channels
from ..losses import LOSSES
from ..models import label_targets, split_outputs
from ..tensors import normalize

__all__ = ["PseudoSettings", "confidence_stats", "finetune", "select_confident", "PseudoSet"]


@dataclass(frozen=True)
class PseudoSettings:
    """Which test images count as confident, and how fine-tuning runs.

    Attributes:
        low, high: a class is confidently absent when its maximum pixel probability is ``<= low`` and confidently
            present when it is ``>= high``; anything in between makes the image uncertain (1st and 40th places).
        label_low, label_high: the same bounds on the classifier's probability, which must agree with the masks.
        max_uncertain: for a present class, the largest fraction of its candidate pixels (probability ``> low``)
            that may lie strictly between ``low`` and ``high``.
        max_images: cap on pseudo-labelled images per round (the most confident first).
        steps: fine-tuning optimiser steps per fold model per round (the planner may lower it).
        batch_size: images per step, half training images and half pseudo-labelled test images.
        lr: Adam learning rate of the fine-tuning.
        snapshots: weight snapshots kept per fine-tuning (evenly spaced, the last included).
        rounds: pseudo-label rounds.
    """

    low: float = 0.2
    high: float = 0.8
    label_low: float = 0.2
    label_high: float = 0.8
    max_uncertain: float = 0.5
    max_images: int = 2000
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-4
    snapshots: int = 3
    rounds: int = 1


def confidence_stats(probs: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class statistics of one image's probabilities for :func:`select_confident`.

    Args:
        probs: ``(4, H, W)`` uint8 (x 255).

    Returns:
        ``(max_prob, uncertain)``: ``(4,)`` float in [0, 1] and ``(4,)`` fraction of the pixels above ``low`` that are
        below ``high`` (0 when no pixel is above ``low``).
    """
    flat = probs.reshape(probs.shape[0], -1)
    lo, hi = int(np.floor(low * 255)), int(np.ceil(high * 255))
    above = np.count_nonzero(flat > lo, axis=1)  # count_nonzero: several times faster than a bool sum
    middle = above - np.count_nonzero(flat >= hi, axis=1)
    return flat.max(1) / 255.0, np.where(above > 0, middle / np.maximum(above, 1), 0.0)


def select_confident(
    max_prob: np.ndarray,
    uncertain: np.ndarray,
    label_probs: np.ndarray | None,
    settings: PseudoSettings,
    usable: np.ndarray | None = None,
    per_class_labels: bool = True,
) -> np.ndarray:
    """Indices of confident test images, most confident first, at most ``settings.max_images``.

    Args:
        max_prob: ``(N, 4)`` maximum pixel probability per class.
        uncertain: ``(N, 4)`` fraction of uncertain candidate pixels per class (:func:`confidence_stats`).
        label_probs: ``(N, 4)`` classifier probabilities, or ``None`` without classifiers.
        usable: ``(N,)`` bool, False for images that could not be read.
        per_class_labels: the label probabilities are per class (multi-label classifiers); ``False`` when they are
            one "any defect" probability broadcast to the 4 classes.

    An image is confident when every class is confidently absent or confidently present (with few uncertain
    pixels), and, with a classifier, the classifier agrees: per class for multi-label classifiers; for an "any
    defect" classifier, high when the masks have a defect and low when they have none. Confidence = the smallest
    margin of any class to the uncertain band.
    """
    absent = max_prob <= settings.low
    present = (max_prob >= settings.high) & (uncertain <= settings.max_uncertain)
    ok = absent | present
    margin = np.where(absent, settings.low - max_prob, max_prob - settings.high)
    if label_probs is not None:
        if per_class_labels:
            agree = np.where(present, label_probs >= settings.label_high, label_probs <= settings.label_low)
            label_margin = np.where(present, label_probs - settings.label_high, settings.label_low - label_probs)
        else:
            any_label = label_probs.max(1, keepdims=True)
            defect = present.any(1, keepdims=True)
            image_margin = np.where(defect, any_label - settings.label_high, settings.label_low - any_label)
            agree = np.broadcast_to(image_margin >= 0, ok.shape)
            label_margin = np.broadcast_to(image_margin, ok.shape)
        ok &= agree
        margin = np.minimum(margin, label_margin)
    chosen = ok.all(1)
    if usable is not None:
        chosen &= usable
    index = np.nonzero(chosen)[0]
    order = np.argsort(-margin[index].min(1), kind="stable")
    return index[order][: settings.max_images]


class PseudoSet(Dataset):
    """Training images with their true masks plus test images with pseudo masks, at one model's input size.

    Items are ``(image (1, h, w) uint8, masks (4, h, w) uint8)``; the source callables return full-size grey images
    and ``(4, h', w')`` masks at any size (resized nearest to ``(h, w)``).
    """

    def __init__(self, items: Sequence[tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]], size) -> None:
        self.items = list(items)
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        read_image, read_masks = self.items[index]
        h, w = self.size
        image = read_image()
        if image.shape != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        masks = read_masks()
        if masks.shape[-2:] != (h, w):
            masks = resize_channels(masks, (h, w), cv2.INTER_NEAREST)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(masks))


def _finetune_loss(output, masks: torch.Tensor, head: str, classes: Sequence[int], aux_head: bool) -> torch.Tensor:
    mask_logits, label_logits = split_outputs(output)
    idx = [c - 1 for c in classes]
    if head == "softmax5":
        loss = LOSSES["cce"](mask_logits, masks) + LOSSES["softmax_dice"](mask_logits, masks)
    else:
        target = masks[:, idx]
        loss = LOSSES["bce"](mask_logits, target) + LOSSES["dice"](mask_logits, target)
    if aux_head and label_logits is not None:
        labels = label_targets(masks, head, classes)
        loss = loss + 0.4 * LOSSES["bce"](label_logits, labels)
    return loss


def finetune(
    module: torch.jit.ScriptModule,
    entry,
    dataset_train: Sequence,
    dataset_pseudo: Sequence,
    settings: PseudoSettings,
    steps: int,
    device: torch.device,
    seed: int = 0,
    deadline=None,
    fp16: bool = True,
    num_workers: int = 0,
) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Fine-tune a loaded segmenter in place on training + pseudo-labelled images.

    Args:
        module: the TorchScript segmenter (trained in ``train()`` mode, left in ``eval()`` mode).
        entry: its manifest entry (input normalisation and scale, head, classes).
        dataset_train, dataset_pseudo: :class:`PseudoSet` of training images and of pseudo-labelled test images.
        steps: optimiser steps.
        deadline: an object with ``check()`` raising when time is up (checked every step).

    Returns:
        ``(snapshots, info)``: ``settings.snapshots`` evenly spaced CPU state dicts (the last is the final weights)
        and ``{"steps", "seconds", "loss_first", "loss_last"}``.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    half = max(1, settings.batch_size // 2)

    def loader(dataset):
        sampler = RandomSampler(dataset, replacement=True, num_samples=steps * half, generator=generator)
        return iter(DataLoader(dataset, batch_size=half, sampler=sampler, num_workers=num_workers))

    train_iter, pseudo_iter = loader(dataset_train), loader(dataset_pseudo)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=settings.lr)
    use_amp = fp16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    inputs = entry.input
    keep = {max(1, round(steps * (i + 1) / settings.snapshots)) for i in range(settings.snapshots)}
    snapshots, losses = [], []
    module.train()
    try:
        for step in range(1, steps + 1):
            if deadline is not None:
                deadline.check()
            (a, ma), (b, mb) = next(train_iter), next(pseudo_iter)
            images = torch.cat([a, b]).to(device)
            masks = torch.cat([ma, mb]).to(device)
            flips = torch.rand(2, generator=generator) < 0.5
            dims = [d for d, f in zip((-1, -2), flips.tolist()) if f]
            if dims:
                images, masks = torch.flip(images, dims), torch.flip(masks, dims)
            x = normalize(images, inputs["mean"], inputs["std"])
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                output = module(x)
            loss = _finetune_loss(output, masks, entry.activation, entry.classes, entry.aux_head)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            if step in keep:
                snapshots.append(cpu_state_dict(module))
    finally:
        module.eval()
    info = {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - start, 3),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-3:])) if losses else None,
    }
    return snapshots, info
