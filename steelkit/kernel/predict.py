"""Streaming fold ensemble with flip TTA: uint8 batches in, uint8 per-class probabilities out, bounded memory.

Per model: normalisation and input scale from its manifest entry, flip TTA views reduced by the mean or by
temperature sharpening (mean of ``p ** t``), ``softmax5`` heads turned into 4 per-class probabilities, two-headed
models gated by their own label head (mask x label probability). Across models: a weighted mean per class over the
models that predict the class (per-class binary segmenters add to their class only). Classifiers are predicted
alongside: ``(B, 4)`` label probabilities ("any defect" heads are broadcast to the 4 classes).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..constants import NUM_CLASSES
from ..images import read_grey
from ..manifest import Manifest, ModelEntry
from ..models import label_probabilities, mask_probabilities, split_outputs
from ..tensors import normalize, resize_to, scaled_size, to_uint8, tta_views

__all__ = [
    "NOTE",
    "REDUCTIONS",
    "Ensemble",
    "LoadedModel",
    "TestImages",
    "load_models",
    "predict_stream",
    "read_fitted",
]

#: how TTA views of one model are combined
REDUCTIONS = ("mean", "sharpen")
#: prefix of a per-image message that is a note (the image was predicted after a repair), not an error
NOTE = "note: "
#: largest relative difference of aspect ratio for which an image of the wrong size is resized and predicted
ASPECT_TOLERANCE = 0.02


class TestImages(Dataset):
    """Images decoded as grey in DataLoader workers (test images, or training images for out-of-fold predictions).

    Items are ``(index, image, message)``: ``(1, H, W)`` uint8 and ``""``. Any number of channels is read as grey. An
    image of the wrong size with the expected aspect ratio (e.g. 800x128 for 1600x256) is resized to the expected
    size and predicted, with a message starting with :data:`NOTE`. An unreadable image, or one of another aspect
    ratio (e.g. rotated: the orientation cannot be known), gives a zero image and the error message: it is then
    predicted empty and reported.
    """

    def __init__(self, folder: Path, image_ids: Sequence[str], shape: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.image_ids = list(image_ids)
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        path = self.folder / self.image_ids[index]
        try:
            image, message = read_fitted(path, self.shape)
        except ValueError as err:
            image, message = np.zeros(self.shape, dtype=np.uint8), str(err)
        return index, torch.from_numpy(image)[None], message


def read_fitted(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Read ``path`` as grey at ``shape``: ``(image, "")``, or ``(resized image, note)`` when it had the expected
    aspect ratio but another size.

    Raises:
        ValueError: unreadable, or of another aspect ratio (named in the message).
    """
    image = read_grey(path)
    if image.shape == tuple(shape):
        return image, ""
    (h, w), (eh, ew) = image.shape, shape
    found, expected = f"{w}x{h}", f"{ew}x{eh}"
    if abs((w / h) / (ew / eh) - 1) > ASPECT_TOLERANCE:
        raise ValueError(f"{path}: image is {found} (WxH), expected {expected}, another aspect ratio (rotated?)")
    resized = cv2.resize(image, (ew, eh), interpolation=cv2.INTER_AREA if w > ew else cv2.INTER_LINEAR)
    return resized, f"{NOTE}{path}: image is {found} (WxH), expected {expected}; predicted after resizing"


@dataclass
class LoadedModel:
    """A TorchScript model with its manifest entry; ``weight`` is its weight in the ensemble mean."""

    entry: ModelEntry
    module: torch.jit.ScriptModule
    weight: float = 1.0

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def class_index(self) -> list[int]:
        return [c - 1 for c in self.entry.classes]


def load_models(
    manifest: Manifest, entries: Sequence[ModelEntry], device: torch.device, weights: dict[str, float] | None = None
) -> tuple[list[LoadedModel], list[str]]:
    """Load TorchScript segmenters and classifiers; a file that fails to load is reported and skipped.

    Args:
        weights: ensemble weight per model name (default: the entry's ``weight``, else 1).
    """
    loaded, problems = [], []
    for entry in entries:
        path = manifest.path_of(entry.file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
                module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as err:  # noqa: BLE001 - any load failure means: skip this model, say why
            first = (str(err).strip().splitlines() or [""])[0]
            problems.append(f"{path}: TorchScript load failed: {type(err).__name__}: {first}")
            continue
        weight = float((weights or {}).get(entry.name, entry.extra.get("weight", 1.0)))
        loaded.append(LoadedModel(entry, module, weight))
    return loaded, problems


def _finite(logits: torch.Tensor | None) -> bool:
    """Whether every logit is finite (``None``: nothing to check). An Inf logit is a broken model even though
    sigmoid(Inf) = 1; one float32 sum (NaN or Inf if any element is) checks a whole batch in one pass."""
    return logits is None or bool(torch.isfinite(logits.sum(dtype=torch.float32)))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Ensemble:
    """Weighted per-class mean of the segmenters' probabilities over TTA views, at full image resolution.

    Args:
        models: loaded models (segmenters and classifiers); each is fed its own normalisation and input scale.
        tta: name of a TTA view set (``none``, ``h``, ``v``, ``hv``).
        device: where the models live.
        fp16: autocast the forward passes to float16 on CUDA.
        reduction: ``mean`` or ``sharpen`` (mean of ``p ** temperature`` over the views).
        temperature: the sharpening exponent.
        max_batch: images per forward pass; halved on an out-of-memory error, down to 1.
        memory_cap: simulate an out-of-memory error for forward passes of more images than this (tests of the OOM
            path on machines without a GPU); ``None`` = off.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel],
        tta: str,
        device: torch.device,
        fp16: bool = True,
        reduction: str = "mean",
        temperature: float = 1.0,
        max_batch: int = 64,
        memory_cap: int | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise KeyError(f"unknown reduction {reduction!r}; valid: {list(REDUCTIONS)}")
        self.models = list(models)
        self.segmenters = [m for m in self.models if m.kind == "segmenter"]
        self.classifiers = [m for m in self.models if m.kind == "classifier"]
        if not self.segmenters:
            raise ValueError("an ensemble needs at least one segmenter")
        self.views = tta_views(tta)
        self.tta = tta
        self.device = device
        self.fp16 = fp16 and device.type == "cuda"
        self.reduction = reduction
        self.temperature = temperature
        self.max_batch = max_batch
        self.memory_cap = memory_cap
        self.oom_messages: list[str] = []
        self.oom_events = 0
        #: forward passes (chunks of at most ``max_batch`` images) run, and per model those with non-finite output
        self.chunks = 0
        self.non_finite: dict[str, int] = {}
        #: images of chunks where no segmenter gave finite probabilities (predicted empty)
        self.failed_images = 0

    @property
    def problems(self) -> list[str]:
        """What went wrong so far, one line each: out-of-memory halvings, then models with non-finite output."""
        lines = list(self.oom_messages)
        for name, count in self.non_finite.items():
            lines.append(
                f"{name}: non-finite output (NaN or Inf) on {count} of {self.chunks} forward passes; left out of "
                "the mean there" + ("" if count < self.chunks else ": the model never gave a usable prediction")
            )
        if self.failed_images:
            lines.append(f"no segmenter gave finite output for {self.failed_images} images: predicted empty")
        return lines

    def failed_models(self) -> list[str]:
        """Models whose every forward pass so far was non-finite (the kernel drops them)."""
        return [name for name, count in self.non_finite.items() if self.chunks and count >= self.chunks]

    def _failed(self, model: LoadedModel) -> None:
        self.non_finite[model.entry.name] = self.non_finite.get(model.entry.name, 0) + 1

    def _forward(self, model: LoadedModel, x: torch.Tensor):
        if self.memory_cap is not None and x.shape[0] > self.memory_cap:
            raise torch.OutOfMemoryError(f"simulated out of memory: {x.shape[0]} images > memory cap {self.memory_cap}")
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            return split_outputs(model.module(x))

    def _reduce(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Mean (or sharpened mean) of the views, in place in the first view's tensor."""
        if self.reduction == "sharpen":
            views = [v.clamp_(0, 1).pow_(self.temperature) for v in views]
        out = views[0]
        for v in views[1:]:
            out.add_(v)
        return out.div_(len(views)) if len(views) > 1 else out

    def _model_probs(self, model: LoadedModel, images: torch.Tensor):
        """``(mask_probs (B, C, H, W) | None, label_probs (B, L) | None)`` of one model over the TTA views; both
        ``None`` when any logit of any view is NaN or Inf."""
        inputs = model.entry.input
        full = tuple(images.shape[-2:])
        size = scaled_size(full, float(inputs["scale"]))
        x = resize_to(normalize(images, inputs["mean"], inputs["std"]), size, "area")
        masks, labels = [], []
        for dims in self.views:
            mask_logits, label_logits = self._forward(model, torch.flip(x, dims) if dims else x)
            if not (_finite(mask_logits) and _finite(label_logits)):
                return None, None
            if mask_logits is not None:
                p = mask_probabilities(mask_logits.float(), model.entry.activation)
                masks.append(torch.flip(p, dims) if dims else p)
            if label_logits is not None:
                labels.append(label_probabilities(label_logits.float()))
        mask = None if not masks else resize_to(self._reduce(masks), full, "bilinear")
        label = None if not labels else self._reduce(labels)
        return mask, label

    def _compute(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, full = images.shape[0], tuple(images.shape[-2:])
        total = torch.zeros((b, NUM_CLASSES) + full, device=images.device)
        weight = torch.zeros(NUM_CLASSES, device=images.device)
        for model in self.segmenters:
            probs, labels = self._model_probs(model, images)
            if probs is None:
                self._failed(model)
                continue
            if labels is not None and model.entry.aux_head:  # two-headed: gate its own masks (soft)
                probs.mul_(labels[:, :, None, None])
            idx = model.class_index
            if len(idx) == NUM_CLASSES:
                total.add_(probs, alpha=model.weight)
            else:
                total[:, idx] += model.weight * probs
            weight[idx] += model.weight
        if not (weight > 0).any():
            self.failed_images += b
        probs = total.div_(weight.clamp(min=1e-12).view(1, -1, 1, 1))
        label_total = torch.zeros((b, NUM_CLASSES), device=images.device)
        label_weight = torch.zeros(NUM_CLASSES, device=images.device)
        for model in self.classifiers:
            _, labels = self._model_probs(model, images)
            if labels is None:
                self._failed(model)
                continue
            idx = list(range(NUM_CLASSES)) if model.entry.activation == "binary" else model.class_index
            label_total[:, idx] += model.weight * (
                labels if labels.shape[1] == len(idx) else labels.expand(-1, len(idx))
            )
            label_weight[idx] += model.weight
        if not self.classifiers or not (label_weight > 0).any():
            return probs, None
        # a class no classifier covers is not gated: probability 1
        label_probs = torch.where(
            label_weight > 0, label_total / label_weight.clamp(min=1e-12), torch.ones_like(label_total)
        )
        return probs, label_probs

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 1, H, W)`` uint8 on the device -> ``(B, 4, H, W)`` float32 probabilities and ``(B, 4)`` label
        probabilities (``None`` without classifiers).

        Forward passes run on chunks of ``max_batch`` images; an out-of-memory error halves ``max_batch`` and retries
        (down to one image, then the error propagates). A model whose output is not finite for a batch is left out of
        that batch's mean and reported.
        """
        while True:
            try:
                state = (self.chunks, dict(self.non_finite), self.failed_images)
                parts = []
                for i in range(0, len(images), self.max_batch):
                    self.chunks += 1
                    parts.append(self._compute(images[i : i + self.max_batch]))
                break
            except RuntimeError as err:
                if not _is_oom(err) or self.max_batch <= 1:
                    raise
                self.chunks, self.non_finite, self.failed_images = state  # the retry counts the batch once
                self.max_batch = max(1, min(self.max_batch, len(images)) // 2)
                self.oom_events += 1
                self.oom_messages.append(
                    f"out of memory ({str(err).splitlines()[0]}); batch halved to {self.max_batch}"
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        probs = torch.cat([p for p, _ in parts])
        labels = None if parts[0][1] is None else torch.cat([lab for _, lab in parts])
        return probs, labels


def predict_stream(
    ensemble: Ensemble,
    folder: Path,
    image_ids: Sequence[str],
    shape: tuple[int, int],
    batch_size: int,
    num_workers: int,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None, list[str]]]:
    """Yield ``(indices, probs, label_probs, errors)`` per batch: ``(B, 4, H, W)`` uint8 probabilities x 255 and
    ``(B, 4)`` float32 label probabilities (or ``None``) on the CPU.

    Only one batch of probabilities exists at a time, so memory is bounded whatever the test-set size.
    """
    loader = DataLoader(
        TestImages(folder, image_ids, shape),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ensemble.device.type == "cuda",
    )
    for indices, images, errors in loader:
        probs, labels = ensemble(images.to(ensemble.device, non_blocking=True))
        yield (
            indices.tolist(),
            to_uint8(probs).cpu().numpy(),
            None if labels is None else labels.float().cpu().numpy(),
            list(errors),
        )
