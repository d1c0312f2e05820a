"""Training augmentation, built in code from the config's ``{name: probability}`` mapping (never from class paths).

Importing this module does not import albumentations: the builders import it when they run, and
:class:`DefectBlackout` (an albumentations ``DualTransform``) is created on first access.

Randomness: a pipeline draws everything from the ``seed`` it is called with. albumentations 2.x's
``Compose.set_random_seed`` hands *the same* seed to every transform, so that ``hflip`` and ``vflip`` at ``p=0.5``
would always fire together; :class:`Augmenter` instead gives each transform its own seed, drawn from
``np.random.default_rng(seed)``.

Class-weighted augmentation (Nie et al.): an image is augmented with probability ``1 - frequency`` of its rarest
class (:func:`class_augment_probability`), so rare defects are seen in more variations than common ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

__all__ = [
    "AUGMENTATIONS",
    "UNGATED",
    "Augmenter",
    "build_augment",
    "class_augment_probability",
    "group_flags",
    "group_frequencies",
    "validate_augment",
]


# ------------------------------------------------------------------------------------------------ builders
def _hflip(p: float):
    import albumentations as A

    return A.HorizontalFlip(p=p)


def _vflip(p: float):
    import albumentations as A

    return A.VerticalFlip(p=p)


def _shift_scale_rotate(p: float, shift: float = 0.0625, scale: float = 0.1, rotate: float = 10.0):
    """Shift by up to ``shift`` of each side, zoom by ``1 +- scale``, rotate by up to ``rotate`` degrees; the
    uncovered border is 0 in the image (off-sheet black) and in the masks."""
    import albumentations as A
    import cv2

    return A.Affine(
        translate_percent=(-shift, shift),
        scale=(1 - scale, 1 + scale),
        rotate=(-rotate, rotate),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _brightness_contrast(p: float, limit: float = 0.2):
    import albumentations as A

    return A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=p)


def _gamma(p: float, gamma_limit: Sequence[float] = (80, 120)):
    import albumentations as A

    return A.RandomGamma(gamma_limit=tuple(gamma_limit), p=p)


def _noise(p: float, std_range: Sequence[float] = (0.01, 0.04)):
    """Gaussian noise with a standard deviation drawn from ``std_range`` (fractions of 255)."""
    import albumentations as A

    return A.GaussNoise(std_range=tuple(std_range), p=p)


def _coarse_dropout(p: float, holes: int = 4, size: float = 0.08):
    """1 to ``holes`` black rectangles, each side ``size / 2`` to ``size`` of the image's side; masks untouched."""
    import albumentations as A

    return A.CoarseDropout(
        num_holes_range=(1, int(holes)),
        hole_height_range=(size / 2, size),
        hole_width_range=(size / 2, size),
        fill=0,
        fill_mask=None,
        p=p,
    )


def _defect_blackout(p: float):
    return _defect_blackout_class()(p=p)


#: augmentation builders by config name: ``builder(p, **params)`` returns an albumentations transform. A pipeline
#: runs them in this order whatever the order of the config mapping: flips, geometry, photometry, dropout, blackout.
#: The parameters each accepts besides ``p`` (and their defaults) are those of its signature.
AUGMENTATIONS: dict[str, Callable[..., Any]] = {
    "hflip": _hflip,
    "vflip": _vflip,
    "shift_scale_rotate": _shift_scale_rotate,
    "brightness_contrast": _brightness_contrast,
    "gamma": _gamma,
    "noise": _noise,
    "coarse_dropout": _coarse_dropout,
    "defect_blackout": _defect_blackout,
}
#: augmentations that class-weighted augmentation does not gate: the flips (label-preserving symmetries of the
#: sheet) and ``defect_blackout`` (a label trick for classifiers: gating it by rarity would erase rare classes most)
UNGATED = ("hflip", "vflip", "defect_blackout")


def _params_of(name: str) -> tuple[str, ...]:
    return tuple(inspect.signature(AUGMENTATIONS[name]).parameters)[1:]


def _probability(name: str, value: Any) -> tuple[float, dict[str, Any]]:
    """``(p, params)`` of one spec entry, validated (see :func:`validate_augment`)."""
    if isinstance(value, Mapping):
        params = dict(value)
        if "p" not in params:
            raise ValueError(f"augment.{name}: a mapping needs 'p', e.g. {{p: 0.5}}; got {dict(value)}")
        p = params.pop("p")
        unknown = sorted(set(params) - set(_params_of(name)))
        if unknown:
            raise ValueError(f"augment.{name}: unknown parameter(s) {unknown}; valid: {['p', *_params_of(name)]}")
        for key, v in params.items():
            pair = isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2
            if not (_is_number(v) or (pair and all(_is_number(x) for x in v))):
                raise ValueError(f"augment.{name}.{key} must be a number or a pair of numbers, got {v!r}")
    else:
        p, params = value, {}
    if not _is_number(p) or not 0 <= p <= 1:
        raise ValueError(f"augment.{name}: probability must be a number in [0, 1], got {p!r}")
    return float(p), params


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_augment(spec: Mapping[str, Any]) -> None:
    """Check an augmentation spec without importing albumentations.

    Args:
        spec: ``{name: p}`` or ``{name: {p: ..., param: value}}``; names from :data:`AUGMENTATIONS`, parameters
            from the builder's signature; a value is a number or a pair of numbers.

    Raises:
        KeyError: an unknown name (the message lists the valid names).
        ValueError: not a mapping, a probability outside [0, 1], a missing ``p`` or an unknown parameter.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"data.augment must be a mapping {{name: probability}}, got {spec!r}")
    for name, value in spec.items():
        if name not in AUGMENTATIONS:
            raise KeyError(f"unknown augmentation {name!r}; valid: {sorted(AUGMENTATIONS)}")
        _probability(name, value)


# ------------------------------------------------------------------------------------------- class weights
def group_flags(flags: np.ndarray) -> np.ndarray:
    """Membership of images in the 5 groups {clean, class 1, class 2, class 3, class 4}.

    Args:
        flags: ``(N, 4)`` class presence.

    Returns:
        ``(N, 5)`` bool: column 0 = no defect, column ``c`` = has class ``c`` (an image may be in several).
    """
    flags = np.asarray(flags).astype(bool).reshape(-1, flags.shape[-1])
    return np.concatenate([~flags.any(axis=1, keepdims=True), flags], axis=1)


def group_frequencies(flags: np.ndarray) -> np.ndarray:
    """``(5,)`` float64 fraction of images in each group of :func:`group_flags` (0 for an empty ``flags``)."""
    groups = group_flags(flags)
    return groups.mean(axis=0) if len(groups) else np.zeros(groups.shape[1])


def class_augment_probability(flags: np.ndarray, image_flags: np.ndarray) -> float | np.ndarray:
    """Probability of augmenting an image under class-weighted augmentation (Nie et al.).

    Each group gets ``1 - frequency``; a defective image takes the largest among its classes (its rarest class), a
    clean image the clean group's ``1 - fraction of clean images``. On the real train set: clean 0.53, class 1 0.93,
    class 2 0.98, class 3 0.59, class 4 0.94.

    Args:
        flags: ``(N, 4)`` class presence of the training images (the frequencies).
        image_flags: ``(4,)`` presence of one image, or ``(M, 4)`` of several.

    Returns:
        A float for one image, ``(M,)`` float64 for several.
    """
    probability = 1.0 - group_frequencies(flags)
    image_flags = np.asarray(image_flags)
    out = np.where(group_flags(image_flags), probability, -np.inf).max(axis=1)
    return float(out[0]) if image_flags.ndim == 1 else out


# ------------------------------------------------------------------------------------------------ pipeline
class Augmenter:
    """A seeded augmentation pipeline (built by :func:`build_augment`).

    Call it as ``augment(image, masks, seed, class_probability=None)``:

    * ``image``: ``(H, W)`` uint8 grey; ``masks``: ``(H, W, 4)`` uint8 {0, 1}.
    * ``seed``: everything random is drawn from ``np.random.default_rng(seed)``: the class-weighted gate first,
      then one seed per transform (always drawn, so the gate does not shift the others' draws).
    * ``class_probability``: the gate of the transforms not in :data:`UNGATED`; they run (each with its own ``p``)
      only when a uniform draw falls below it. ``None`` = the default given to :func:`build_augment` (``None`` there
      too = no gate).

    Returns ``(image, masks)`` of the same shapes and dtypes; geometric transforms move both, photometric ones and
    ``coarse_dropout`` change the image only. Transforms run in :data:`AUGMENTATIONS` order.
    """

    def __init__(self, transforms: Sequence[tuple[str, Any]], class_probability: float | None = None) -> None:
        import albumentations as A

        self.names = [name for name, _ in transforms]
        self.transforms = [t for _, t in transforms]
        self.class_probability = class_probability
        # the same transform objects, all of them or the ungated ones only (when the gate is closed)
        self._all = A.Compose(self.transforms)
        self._ungated = A.Compose([t for name, t in transforms if name in UNGATED])

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, seed: int, class_probability: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.transforms:
            return image, masks
        rng = np.random.default_rng(seed)
        gate = self.class_probability if class_probability is None else class_probability
        closed = gate is not None and rng.random() >= gate
        for transform, s in zip(self.transforms, rng.integers(2**31, size=len(self.transforms))):
            transform.set_random_seed(int(s))  # one seed each: Compose.set_random_seed would share one
        pipeline = self._ungated if closed else self._all
        out = pipeline(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(masks))
        return np.ascontiguousarray(out["image"].reshape(image.shape)), np.ascontiguousarray(out["mask"])


def build_augment(spec: Mapping[str, Any], train: bool, class_probability: float | None = None) -> Augmenter:
    """The augmentation pipeline of a spec (``DataConfig.augment``).

    Args:
        spec: ``{name: p}`` or ``{name: {p: ..., param: value}}`` (see :func:`validate_augment`).
        train: ``False`` gives the identity (validation and inference are never augmented).
        class_probability: default gate of the non-:data:`UNGATED` transforms (see :class:`Augmenter`).

    Returns:
        An :class:`Augmenter`: ``(image (H, W) uint8, masks (H, W, 4) uint8, seed) -> (image, masks)``.

    Raises:
        KeyError, ValueError: as :func:`validate_augment`.
    """
    validate_augment(spec)
    transforms = []
    for name in AUGMENTATIONS if train else ():
        if name in spec:
            p, params = _probability(name, spec[name])
            if p > 0:
                transforms.append((name, AUGMENTATIONS[name](p, **params)))
    return Augmenter(transforms, class_probability)


# -------------------------------------------------------------------------------------------- blackout
def _make_defect_blackout() -> type:
    from albumentations.core.transforms_interface import DualTransform

    class DefectBlackout(DualTransform):
        """With probability ``p``, for an image with a defect, black out the pixels of one random present class and
        clear that class's mask, so that a classifier learns the label goes away with the defect.

        Targets: ``image`` ``(H, W)`` uint8 and ``mask`` ``(H, W, 4)`` uint8 {0, 1} (both required).
        """

        def __init__(self, p: float = 0.5) -> None:
            super().__init__(p=p)

        @property
        def targets_as_params(self) -> list[str]:
            return ["mask"]

        def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
            present = np.flatnonzero(np.asarray(data["mask"]).reshape(-1, data["mask"].shape[-1]).any(axis=0))
            index = int(present[self.random_generator.integers(len(present))]) if len(present) else -1
            zone = data["mask"][..., index] > 0 if index >= 0 else None
            return {"class_index": index, "zone": zone}

        def apply(self, img: np.ndarray, class_index: int, zone: np.ndarray | None, **params: Any) -> np.ndarray:
            if zone is None:
                return img
            img = img.copy()
            img[zone] = 0
            return img

        def apply_to_mask(self, mask: np.ndarray, class_index: int, **params: Any) -> np.ndarray:
            if class_index < 0:
                return mask
            mask = mask.copy()
            mask[..., class_index] = 0
            return mask

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ()

    # picklable (DataLoader workers under spawn) as steelkit.augment.DefectBlackout, resolved by __getattr__
    DefectBlackout.__module__, DefectBlackout.__qualname__ = __name__, "DefectBlackout"
    return DefectBlackout


_LAZY: dict[str, type] = {}


def _defect_blackout_class() -> type:
    if "DefectBlackout" not in _LAZY:
        _LAZY["DefectBlackout"] = _make_defect_blackout()
    return _LAZY["DefectBlackout"]


def __getattr__(name: str) -> Any:
    """``DefectBlackout`` is created on first access, so that importing this module does not import albumentations."""
    if name == "DefectBlackout":
        return _defect_blackout_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
