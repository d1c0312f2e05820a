"""Model registries, build functions and output helpers.

Two kinds of model, one registry each:

* :data:`SEGMENTERS`: segmentation-models-pytorch architectures mapping ``(N, 3, H, W)`` normalised images to mask
  logits ``(N, C, H, W)``, or to ``(mask_logits, label_logits)`` with an auxiliary classification head.
* :data:`CLASSIFIERS`: image-level classifiers mapping ``(N, 3, H, W)`` to label logits ``(N, L)``, used to gate masks.

Every registered model passes ``torch.jit.script`` (checked in ``tests/test_models.py``), so the kernel loads
TorchScript files and imports none of these libraries. The helpers :func:`split_outputs`, :func:`mask_probabilities`
and :func:`label_probabilities` turn a model's raw output (eager or scripted) into probabilities, the same way in
training, export and the kernel.

``encoder_weights="imagenet"`` is tried when a model is built and falls back to random initialisation with a warning
when the weights can be neither downloaded nor found in the local cache (see :func:`build_model_with_info`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ModelConfig

__all__ = [
    "check_model_config",
    "ARCHITECTURES",
    "CLASSIFIERS",
    "MASK_HEADS",
    "SEGMENTERS",
    "EfficientNetClassifier",
    "EncoderClassifier",
    "build_classifier",
    "build_model",
    "build_model_with_info",
    "build_segmenter",
    "label_probabilities",
    "label_targets",
    "mask_probabilities",
    "split_outputs",
]


def _smp():
    import segmentation_models_pytorch as smp  # train extra: imported only when a model is built

    return smp


#: segmenter name (``model.arch`` of a segmenter) -> smp constructor. All of them script with ``torch.jit.script``.
#: ``unetplusplus`` is left out: smp 0.6.0's ``UnetPlusPlusDecoder`` indexes an ``nn.ModuleDict`` with computed keys,
#: which TorchScript refuses. ``pan`` needs H and W of at least 128 (its pyramid pools the stride-32 feature thrice).
SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "unet": lambda **kw: _smp().Unet(**kw),
    "fpn": lambda **kw: _smp().FPN(**kw),
    "pspnet": lambda **kw: _smp().PSPNet(**kw),
    "deeplabv3plus": lambda **kw: _smp().DeepLabV3Plus(**kw),
    "linknet": lambda **kw: _smp().Linknet(**kw),
    "manet": lambda **kw: _smp().MAnet(**kw),
    "pan": lambda **kw: _smp().PAN(**kw),
}
#: former name of :data:`SEGMENTERS` (kept for importers)
ARCHITECTURES = SEGMENTERS

#: segmenters that take ``decoder_channels``: ``"stages"`` = one width per decoder stage (5, the encoder depth),
#: ``"single"`` = one width for the whole decoder (``model.decoder_channels: [256]``)
_DECODER_CHANNELS = {"unet": "stages", "manet": "stages", "deeplabv3plus": "single", "pan": "single"}
#: depth of every encoder built here (5 downsamplings: H and W must be multiples of 32)
ENCODER_DEPTH = 5

#: mask heads accepted by :func:`mask_probabilities` (``sigmoid`` is the legacy name of ``sigmoid4``)
MASK_HEADS = ("sigmoid4", "softmax5", "sigmoid")

#: seconds a probe of the weights host may take before the host counts as unreachable (then caches only)
PROBE_TIMEOUT = 3.0
#: host probed before downloading efficientnet-pytorch weights (its release files live on GitHub)
_GITHUB = "https://github.com"


class _EfficientNetBlock(nn.Module):
    """A TorchScript-friendly MBConv block that adopts the layers of an efficientnet-pytorch ``MBConvBlock``.

    Same attribute names as the original, hence the same ``state_dict`` keys; absent layers are ``nn.Identity``
    (no parameters) and the block's ``BlockArgs`` namedtuple becomes plain ``bool`` / ``float`` attributes.
    """

    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        args = block._block_args
        self.has_expansion: bool = args.expand_ratio != 1
        self.has_se: bool = bool(block.has_se)
        self.residual: bool = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
        self.drop_connect_rate: float = float(drop_connect_rate)
        self._expand_conv = block._expand_conv if self.has_expansion else nn.Identity()
        self._bn0 = block._bn0 if self.has_expansion else nn.Identity()
        self._depthwise_conv = block._depthwise_conv
        self._bn1 = block._bn1
        self._se_reduce = block._se_reduce if self.has_se else nn.Identity()
        self._se_expand = block._se_expand if self.has_se else nn.Identity()
        self._project_conv = block._project_conv
        self._bn2 = block._bn2
        self._swish = nn.SiLU()

    def forward(self, inputs: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H / stride, W / stride)``."""
        x = inputs
        if self.has_expansion:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            squeezed = self._se_expand(self._swish(self._se_reduce(nn.functional.adaptive_avg_pool2d(x, 1))))
            x = torch.sigmoid(squeezed) * x
        x = self._bn2(self._project_conv(x))
        if self.residual:
            if self.training and self.drop_connect_rate > 0:
                # stochastic depth as efficientnet-pytorch's drop_connect: keep a sample with probability 1 - rate
                keep = 1.0 - self.drop_connect_rate
                mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


class EfficientNetClassifier(nn.Module):
    """An efficientnet-pytorch ``EfficientNet`` in a form ``torch.jit.script`` accepts.

    efficientnet-pytorch's own modules do not script, even after ``set_swish(memory_efficient=False)``: their
    ``forward`` reads namedtuple fields (``self._block_args.expand_ratio``, ``self._global_params``). This wrapper
    adopts the same layers under the same names, so its ``state_dict`` keys are exactly those of the original (and
    of efficientnet-pytorch checkpoints), and re-states the forward pass with plain attributes, including the
    per-block drop-connect rate ``drop_connect_rate * index / blocks`` that the original computes on the fly.
    """

    def __init__(self, net: nn.Module) -> None:
        """Adopt the layers of ``net``, an ``efficientnet_pytorch.EfficientNet`` built with a classification top."""
        super().__init__()
        params = net._global_params
        if not params.include_top:
            raise ValueError("EfficientNetClassifier needs an EfficientNet with include_top=True")
        rate = float(params.drop_connect_rate or 0.0)
        count = len(net._blocks)
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._blocks = nn.ModuleList(_EfficientNetBlock(b, rate * i / count) for i, b in enumerate(net._blocks))
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self._avg_pooling = net._avg_pooling
        self._dropout = net._dropout
        self._fc = net._fc
        self._swish = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, L)`` label logits."""
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


class EncoderClassifier(nn.Module):
    """Any smp encoder followed by global average pooling of its deepest feature, dropout and a linear layer.

    The head is smp's ``ClassificationHead`` (the same as a segmenter's ``aux_params`` head).
    """

    def __init__(self, encoder: nn.Module, outputs: int, dropout: float = 0.0) -> None:
        """Put a global-pooling classification head on ``encoder``.

        Args:
            encoder: an smp encoder (``smp.encoders.get_encoder``) returning a list of features, deepest last.
            outputs: label logits per image.
            dropout: dropout probability before the linear layer.
        """
        super().__init__()
        self.encoder = encoder
        self.head = _smp().base.ClassificationHead(encoder.out_channels[-1], outputs, pooling="avg", dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, outputs)`` label logits."""
        features = self.encoder(x)
        return self.head(features[-1])


def _efficientnet_classifier(encoder: str, outputs: int, dropout: float, weights: str | None) -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    if weights is None:
        net = EfficientNet.from_name(encoder, num_classes=outputs, dropout_rate=dropout)
    else:
        net = EfficientNet.from_pretrained(encoder, num_classes=outputs, dropout_rate=dropout)
    net.set_swish(memory_efficient=False)
    return EfficientNetClassifier(net)


def _encoder_classifier(encoder: str, outputs: int, dropout: float, weights: str | None) -> nn.Module:
    backbone = _smp().encoders.get_encoder(
        encoder, in_channels=3, depth=ENCODER_DEPTH, weights=_smp_weights(encoder, weights)
    )
    return EncoderClassifier(backbone, outputs, dropout)


#: classifier name (``model.arch`` of a classifier) -> constructor ``(encoder, outputs, dropout, weights)``.
#: ``efficientnet``: efficientnet-pytorch (``encoder`` = ``efficientnet-b0`` .. ``b8``, ``l2``) wrapped for
#: TorchScript; ``encoder``: any smp encoder with a global-pooling head.
CLASSIFIERS: dict[str, Callable[[str, int, float, str | None], nn.Module]] = {
    "efficientnet": _efficientnet_classifier,
    "encoder": _encoder_classifier,
}


def _registry(kind: str) -> dict[str, Callable[..., nn.Module]]:
    return SEGMENTERS if kind == "segmenter" else CLASSIFIERS


def _check_arch(cfg: ModelConfig) -> None:
    registry = _registry(cfg.kind)
    if cfg.arch not in registry:
        raise KeyError(f"unknown {cfg.kind} architecture {cfg.arch!r}; valid: {sorted(registry)}")


def _check_encoder(cfg: ModelConfig) -> None:
    """Raise a ``KeyError`` naming the encoder when ``cfg.arch`` cannot use ``cfg.encoder``."""
    name = cfg.encoder
    if cfg.kind == "classifier" and cfg.arch == "efficientnet":
        from efficientnet_pytorch.model import VALID_MODELS

        if name not in VALID_MODELS:
            raise KeyError(f"unknown efficientnet-pytorch encoder {name!r}; valid: {list(VALID_MODELS)}")
        return
    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            raise KeyError(f"unknown timm encoder {name!r}: {name[3:]!r} is not in timm.list_models()")
        return
    valid = _smp().encoders.get_encoder_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        raise KeyError(
            f"unknown encoder {name!r} for {cfg.kind} {cfg.arch!r}"
            + (f" (did you mean {close}?)" if close else "")
            + f"; valid: {', '.join(sorted(valid))}; or 'tu-<name>' for a model of timm.list_models()"
        )


def check_model_config(cfg: ModelConfig) -> None:
    """Check a model config's names without building anything (fast: run before any data is read).

    Raises:
        KeyError: unknown architecture (listing the valid names of its kind) or unknown encoder (listing the valid
            names).
    """
    _check_arch(cfg)
    _check_encoder(cfg)


def _smp_weights(encoder: str, weights: str | None) -> str | bool | None:
    """smp's ``encoder_weights`` argument: timm-universal (``tu-``) encoders take ``True`` for their default tag."""
    if weights is not None and encoder.startswith("tu-"):
        return True
    return weights


def _decoder_kwargs(cfg: ModelConfig) -> dict[str, int | tuple[int, ...]]:
    if cfg.decoder_channels is None:
        return {}
    style = _DECODER_CHANNELS.get(cfg.arch)
    channels = tuple(int(c) for c in cfg.decoder_channels)
    if style is None:
        raise ValueError(f"model.decoder_channels applies to {sorted(_DECODER_CHANNELS)}, not {cfg.arch!r}")
    if style == "stages" and len(channels) != ENCODER_DEPTH:
        raise ValueError(f"{cfg.arch}: model.decoder_channels needs {ENCODER_DEPTH} widths, got {list(channels)}")
    if style == "single":
        if len(channels) != 1:
            raise ValueError(f"{cfg.arch}: model.decoder_channels needs one width, e.g. [256], got {list(channels)}")
        return {"decoder_channels": channels[0]}
    return {"decoder_channels": channels}


def _build(cfg: ModelConfig, weights: str | None, classes: int | None = None) -> nn.Module:
    """Construct the model of a validated config with ``weights`` (``None`` or ``"imagenet"``)."""
    if cfg.kind == "classifier":
        return CLASSIFIERS[cfg.arch](cfg.encoder, cfg.outputs, cfg.dropout, weights)
    kwargs = dict(
        encoder_name=cfg.encoder,
        encoder_weights=_smp_weights(cfg.encoder, weights),
        in_channels=3,
        classes=cfg.outputs if classes is None else classes,
        **_decoder_kwargs(cfg),
    )
    if cfg.aux_head:
        kwargs["aux_params"] = {"classes": len(cfg.classes), "dropout": cfg.dropout}
    return SEGMENTERS[cfg.arch](**kwargs)


def _reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the host of ``url`` answers an HTTP ``HEAD`` within ``timeout`` seconds (any status counts)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _weights_source(cfg: ModelConfig) -> Iterator[None]:
    """Let a pretrained build use the network only when the weights host answers a quick probe; else caches only.

    huggingface_hub (smp and timm weights) retries an unreachable host for tens of seconds per file, so an
    unreachable hub puts it in offline mode (its module-level ``HF_HUB_OFFLINE``, read on every call) for the
    duration of the build. efficientnet-pytorch downloads through ``torch.hub`` without retries; offline, a file
    missing from the torch hub cache fails at once.

    Raises:
        FileNotFoundError: efficientnet-pytorch weights are not cached and GitHub does not answer.
    """
    if cfg.kind == "classifier" and cfg.arch == "efficientnet":
        from efficientnet_pytorch.utils import url_map

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url_map[cfg.encoder])
        if not cached.is_file() and not _reachable(_GITHUB):
            raise FileNotFoundError(f"{cached} is absent and {_GITHUB} does not answer")
        yield
        return
    from huggingface_hub import constants

    if _reachable(constants.ENDPOINT):
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def build_model_with_info(cfg: ModelConfig) -> tuple[nn.Module, str | None]:
    """Build the model of ``cfg`` and say which encoder weights it actually got.

    Segmenters map ``(N, 3, H, W)`` normalised images (H, W multiples of 32) to mask logits ``(N, cfg.outputs, H, W)``
    (5 channels for ``softmax5``, ``len(cfg.classes)`` for ``sigmoid4``), or with ``cfg.aux_head`` to the tuple
    ``(mask_logits, label_logits (N, len(cfg.classes)))``. Classifiers map them to label logits ``(N, cfg.outputs)``
    (1 for ``binary``, ``len(cfg.classes)`` for ``multilabel``).

    With ``cfg.encoder_weights == "imagenet"`` the pretrained weights are downloaded when the weights host answers a
    quick probe (:data:`PROBE_TIMEOUT`) and otherwise taken from the local caches only; when that fails the model is
    built with random initialisation and a ``UserWarning`` says so.

    Returns:
        ``(model, weights)``: ``weights`` is ``"imagenet"`` when the pretrained weights were loaded, else ``None``.

    Raises:
        KeyError: unknown architecture (listing the valid names of that kind) or unknown encoder (naming it and how
            to list the valid ones).
        ValueError: ``decoder_channels`` given to an architecture that does not take them, or of the wrong length.
    """
    return _build_checked(cfg)


def _build_checked(cfg: ModelConfig, classes: int | None = None) -> tuple[nn.Module, str | None]:
    check_model_config(cfg)
    if cfg.kind == "segmenter":
        _decoder_kwargs(cfg)
    if cfg.encoder_weights is None:
        return _build(cfg, None, classes), None
    try:
        with _weights_source(cfg):
            return _build(cfg, cfg.encoder_weights, classes), cfg.encoder_weights
    except Exception as err:  # no network and no cache: any failure of the download falls back to random weights
        model = _build(cfg, None, classes)  # an invalid combination raises here, with no misleading warning
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(
            f"pretrained {cfg.encoder_weights!r} weights for encoder {cfg.encoder!r} could not be loaded "
            f"({type(err).__name__}: {reason}); using random initialisation (encoder_weights=None)",
            UserWarning,
            stacklevel=3,
        )
    return model, None


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the segmenter or classifier of ``cfg``; see :func:`build_model_with_info` (same errors, warnings)."""
    return build_model_with_info(cfg)[0]


def build_segmenter(cfg: ModelConfig, classes: int | None = None) -> nn.Module:
    """Build a segmenter: ``(N, 3, H, W)`` -> ``(N, classes, H, W)`` logits (or a tuple with an aux head).

    Args:
        cfg: a segmenter config.
        classes: mask channels; ``None`` = ``cfg.outputs``.

    Raises:
        KeyError: unknown architecture, listing the valid names; unknown encoder.
        ValueError: ``cfg`` describes a classifier.
    """
    if cfg.kind != "segmenter":
        raise ValueError(f"build_segmenter needs a segmenter config, got kind {cfg.kind!r}; use build_model")
    return _build_checked(cfg, classes)[0]


def build_classifier(cfg: ModelConfig) -> nn.Module:
    """Build a classifier: ``(N, 3, H, W)`` -> ``(N, cfg.outputs)`` label logits.

    Raises:
        KeyError: unknown architecture, listing the valid names; unknown encoder.
        ValueError: ``cfg`` describes a segmenter.
    """
    if cfg.kind != "classifier":
        raise ValueError(f"build_classifier needs a classifier config, got kind {cfg.kind!r}; use build_model")
    return build_model(cfg)


def split_outputs(output: Tensor | Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """A model's raw output as ``(mask_logits, label_logits)``, either of them ``None`` when the model has none.

    Args:
        output: ``(N, C, H, W)`` mask logits (segmenter), ``(N, L)`` label logits (classifier), or the pair
            ``(mask_logits, label_logits)`` of a segmenter with an auxiliary head (tuple or list).

    Raises:
        ValueError: anything else.
    """
    if isinstance(output, Tensor):
        if output.dim() == 4:
            return output, None
        if output.dim() == 2:
            return None, output
        raise ValueError(f"a model output tensor must be 4-D masks or 2-D labels, got shape {tuple(output.shape)}")
    if isinstance(output, (tuple, list)) and len(output) == 2:
        masks, labels = output
        if isinstance(masks, Tensor) and masks.dim() == 4 and isinstance(labels, Tensor) and labels.dim() == 2:
            return masks, labels
    raise ValueError(f"a model output must be a tensor or a (masks (N, C, H, W), labels (N, L)) pair, got {output!r}")


def mask_probabilities(mask_logits: Tensor, head: str) -> Tensor:
    """Per-class defect probabilities of mask logits.

    Args:
        mask_logits: ``(N, C, H, W)``: ``C`` classes for ``sigmoid4`` (legacy name ``sigmoid``), ``C = 5``
            (background first, then classes 1..4) for ``softmax5``.
        head: one of :data:`MASK_HEADS`.

    Returns:
        ``(N, C, H, W)`` float32 in [0, 1] (``C = 4`` for ``softmax5``: the background channel is dropped, so the
        four channels and the background sum to 1 per pixel).

    Raises:
        KeyError: unknown head, listing the valid names.
        ValueError: ``softmax5`` logits without 5 channels.
    """
    logits = mask_logits.float()
    if head in ("sigmoid4", "sigmoid"):
        return torch.sigmoid(logits)
    if head == "softmax5":
        if logits.dim() != 4 or logits.shape[1] != 5:
            raise ValueError(f"softmax5 mask logits must be (N, 5, H, W), got {tuple(logits.shape)}")
        return torch.softmax(logits, dim=1)[:, 1:]
    raise KeyError(f"unknown mask head {head!r}; valid: {list(MASK_HEADS)}")


def label_probabilities(label_logits: Tensor) -> Tensor:
    """``(N, L)`` label logits -> ``(N, L)`` float32 probabilities (independent sigmoids)."""
    return torch.sigmoid(label_logits.float())


def label_targets(masks: Tensor, head: str, classes: Sequence[int]) -> Tensor:
    """Image-level targets from masks: ``(N, 4, H, W)`` {0, 1} -> ``(N, L)`` float32 {0, 1}.

    ``binary`` heads get "any defect" (``L = 1``); multi-label classifiers and two-headed segmenters get one label per
    class id of ``classes``. Labels follow the (cropped, augmented) masks, so a crop without the defect is clean.
    Training and the kernel's fine-tuning share it.
    """
    present = masks.flatten(2).amax(2).float()
    if head == "binary":
        return present.amax(1, keepdim=True)
    return present[:, [c - 1 for c in classes]]
