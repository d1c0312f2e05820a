"""Streaming fold ensemble with flip TTA: uint8 batches in, uint8 per-class probabilities out, bounded memory."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..images import read_grey
from ..manifest import Manifest, ModelEntry
from ..tensors import apply_tta, normalize, resize_to, scaled_size, to_uint8, tta_views

__all__ = ["Ensemble", "LoadedModel", "TestImages", "load_models", "predict_stream"]


class TestImages(Dataset):
    """Test images decoded as grey in DataLoader workers.

    Items are ``(index, image, error)``: ``(1, H, W)`` uint8 and ``""``; for an unreadable image a zero image and
    the error message (the image is then predicted empty and reported).
    """

    def __init__(self, folder: Path, image_ids: Sequence[str], shape: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.image_ids = list(image_ids)
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        try:
            image = read_grey(self.folder / self.image_ids[index], self.shape)
            error = ""
        except ValueError as err:
            image, error = np.zeros(self.shape, dtype=np.uint8), str(err)
        return index, torch.from_numpy(image)[None], error


@dataclass
class LoadedModel:
    entry: ModelEntry
    module: torch.jit.ScriptModule


def load_models(
    manifest: Manifest, entries: Sequence[ModelEntry], device: torch.device
) -> tuple[list[LoadedModel], list[str]]:
    """Load TorchScript segmenters; a file that fails to load is reported and skipped."""
    loaded, problems = [], []
    for entry in entries:
        if entry.kind != "segmenter":
            continue
        path = manifest.path_of(entry.file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
                module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as err:  # noqa: BLE001 - any load failure means: skip this model, say why
            problems.append(f"{path}: TorchScript load failed: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        loaded.append(LoadedModel(entry, module))
    return loaded, problems


class Ensemble:
    """Mean of the models' per-class probabilities, each over the TTA views, at full image resolution.

    Args:
        models: loaded segmenters; each is fed its own normalisation and input scale from its manifest entry.
        tta: name of a TTA view set (``none``, ``h``, ``v``, ``hv``).
        fp16: autocast the forward passes to float16 on CUDA.
    """

    def __init__(self, models: Sequence[LoadedModel], tta: str, device: torch.device, fp16: bool = True) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        self.views = tta_views(tta)
        self.device = device
        self.fp16 = fp16 and device.type == "cuda"
        self.problems: list[str] = []

    def _probs(self, model: LoadedModel, images: torch.Tensor) -> torch.Tensor:
        inputs = model.entry.input
        full = tuple(images.shape[-2:])
        scale = float(inputs["scale"])
        size = scaled_size(full, scale)
        x = resize_to(normalize(images, inputs["mean"], inputs["std"]), size, "area")

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
                return torch.sigmoid(model.module(batch).float())

        return resize_to(apply_tta(forward, x, self.views), full, "bilinear")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` uint8 on the device -> ``(B, 4, H, W)`` float32 probabilities.

        A model whose output is not finite for a batch is left out of that batch's mean and reported.
        """
        total, used = None, 0
        for model in self.models:
            probs = self._probs(model, images)
            if not torch.isfinite(probs).all():
                self.problems.append(f"{model.entry.name}: non-finite output on a batch; left out of its mean")
                continue
            total = probs if total is None else total + probs
            used += 1
        if total is None:
            return torch.zeros((images.shape[0], 4) + tuple(images.shape[-2:]), device=images.device)
        return total / used


def predict_stream(
    ensemble: Ensemble,
    folder: Path,
    image_ids: Sequence[str],
    shape: tuple[int, int],
    batch_size: int,
    num_workers: int,
) -> Iterator[tuple[list[int], np.ndarray, list[str]]]:
    """Yield ``(indices, probs, errors)`` per batch: ``(B, 4, H, W)`` uint8 probabilities x 255 on the CPU.

    Only one batch of probabilities exists at a time, so memory is bounded whatever the test-set size.
    """
    loader = DataLoader(
        TestImages(folder, image_ids, shape),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ensemble.device.type == "cuda",
    )
    for indices, images, errors in loader:
        probs = ensemble(images.to(ensemble.device, non_blocking=True))
        probs_u8 = to_uint8(probs).cpu().numpy()
        yield indices.tolist(), probs_u8, list(errors)
