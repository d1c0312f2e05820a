"""Tensor helpers shared by training and the kernel: input normalisation, resolution scaling and flip TTA."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TTA_VIEWS", "apply_tta", "normalize", "resize_to", "tta_views"]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Grey uint8 images to normalised float input.

    Args:
        images: ``(N, 1, H, W)`` uint8 grey (or ``(N, 3, H, W)``).
        mean, std: per-channel statistics of ``image / 255``; their length is the model's channel count.

    Returns:
        ``(N, len(mean), H, W)`` float32 ``(image / 255 - mean) / std``.
    """
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m).div_(s)  # a grey channel broadcasts to every channel of mean and std


def scaled_size(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """``(h, w)`` of an ``(H, W)`` image at resolution ``scale`` (training and the kernel resize to the same size)."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def to_uint8(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] to uint8 ``round(p * 255)``: how out-of-fold and test probabilities are kept."""
    scaled = probs.mul(255.0).add_(0.5).clamp_(0, 255)
    if scaled.device.type == "cpu" and scaled.dtype in (torch.float32, torch.float64) and not scaled.requires_grad:
        with np.errstate(invalid="ignore"):  # a NaN (broken model) casts without a warning, as in torch
            return torch.from_numpy(scaled.numpy().astype(np.uint8))  # numpy's cast is several times faster on a CPU
    return scaled.to(torch.uint8)


def resize_to(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``size``; a no-op when already that size.

    ``mode="area"`` for shrinking images (equals cv2.INTER_AREA at integer factors), ``"bilinear"`` for growing
    logits or probabilities, ``"nearest"`` for masks.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


#: TTA view sets by name: each view is (flip dims); the identity view is always first
TTA_VIEWS = {
    "none": ((),),
    "h": ((), (-1,)),
    "v": ((), (-2,)),
    "hv": ((), (-1,), (-2,), (-2, -1)),
}


def tta_views(name: str) -> tuple[tuple[int, ...], ...]:
    """Flip dims of each view of a TTA set; raises ``KeyError`` listing the valid names."""
    if name not in TTA_VIEWS:
        raise KeyError(f"unknown TTA {name!r}; valid: {sorted(TTA_VIEWS)}")
    return TTA_VIEWS[name]


def apply_tta(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, views: Sequence[tuple[int, ...]]
) -> torch.Tensor:
    """Mean of ``fn`` over flipped views, each output flipped back (augment / de-augment pairs).

    Args:
        fn: maps ``(N, C, H, W)`` to ``(N, K, H, W)`` (e.g. per-class probabilities).
        x: the input batch.
        views: flip dims per view, e.g. ``tta_views("hv")``.
    """
    total: list[torch.Tensor] = []
    for dims in views:
        if dims:
            total.append(torch.flip(fn(torch.flip(x, dims)), dims))
        else:
            total.append(fn(x))
    out = total[0]
    for other in total[1:]:
        out = out + other
    return out / len(total)
