"""Model registries and build functions (segmentation-models-pytorch)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import ModelConfig

__all__ = ["ARCHITECTURES", "build_segmenter"]


def _smp():
    import segmentation_models_pytorch as smp  # train extra: imported only when a model is built

    return smp


#: architecture name (as in configs) -> smp constructor
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": lambda **kw: _smp().Unet(**kw),
    "unetplusplus": lambda **kw: _smp().UnetPlusPlus(**kw),
    "fpn": lambda **kw: _smp().FPN(**kw),
    "pspnet": lambda **kw: _smp().PSPNet(**kw),
    "deeplabv3plus": lambda **kw: _smp().DeepLabV3Plus(**kw),
    "linknet": lambda **kw: _smp().Linknet(**kw),
}
#: architectures that take ``decoder_channels``
_HAS_DECODER_CHANNELS = {"unet", "unetplusplus"}


def build_segmenter(cfg: ModelConfig, classes: int = 4) -> nn.Module:
    """Build a segmenter that maps ``(N, 3, H, W)`` normalised images to ``(N, classes, H, W)`` logits.

    Raises:
        KeyError: unknown architecture, listing the valid names.
    """
    if cfg.arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {cfg.arch!r}; valid: {sorted(ARCHITECTURES)}")
    kwargs = dict(encoder_name=cfg.encoder, encoder_weights=cfg.encoder_weights, in_channels=3, classes=classes)
    if cfg.decoder_channels is not None:
        if cfg.arch not in _HAS_DECODER_CHANNELS:
            raise ValueError(f"model.decoder_channels applies to {sorted(_HAS_DECODER_CHANNELS)}, not {cfg.arch!r}")
        kwargs["decoder_channels"] = tuple(cfg.decoder_channels)
    return ARCHITECTURES[cfg.arch](**kwargs)
