"""``weights_manifest.json``: the schema, sha256 pinning, loading with validation (no torch).

Schema (version 1)::

    {
      "schema_version": 1,
      "steelkit_version": "0.1.0",
      "created": "2026-11-21T10:00:00+00:00",
      "image_size": [256, 1600],                    # (H, W) the models were trained for
      "postprocess": {"pixel_threshold": [4 floats], "min_area": [4 ints], "min_component": [4 ints],
                      "label_threshold": [4 floats], "label_source": "max_prob" | "classifier",
                      "source": "how they were chosen"},
      "files": {"folds.csv": {"sha256": "...", "size": 1234}},   # auxiliary files (fold assignment)
      "models": [
        {"name": "cpu-tiny-fold0", "file": "cpu-tiny-fold0.pt", "sha256": "...", "size": 123456,
         "kind": "segmenter", "format": "torchscript", "architecture": "unet", "encoder": "tu-test_efficientnet",
         "fold": 0, "folds": 2, "fold_file": "folds.csv", "classes": [1, 2, 3, 4],
         "activation": "sigmoid4",                  # segmenters: sigmoid4 | softmax5; classifiers: binary | multilabel
         "job": "cpu-tiny", "aux_head": false,      # two-headed models return (masks, labels)
         "averaged_from": [7, 9],                   # epochs whose weights were averaged into this file
         "input": {"channels": 3, "mean": [3 floats], "std": [3 floats], "scale": 0.5},
         "train_size": [128, 256], "val_metric": {"name": "dice", "value": 0.91, "per_class": [4 floats]},
         "thresholds": {"pixel_threshold": [...], "min_area": [...], "min_component": [...]},
         "epoch": 5, "config": {...the TrainConfig...}}
      ]
    }

Files are named relative to the manifest's folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .constants import CLASS_IDS

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FIELDS",
    "SCHEMA_VERSION",
    "Manifest",
    "ModelEntry",
    "load_manifest",
    "save_manifest",
    "sha256_file",
    "verify_files",
]

#: the schema version this steelkit writes and reads
SCHEMA_VERSION = 1
#: the manifest's file name
MANIFEST_NAME = "weights_manifest.json"
#: required keys of a model entry, with their JSON types
MODEL_FIELDS: dict[str, type] = {
    "name": str,
    "file": str,
    "sha256": str,
    "size": int,
    "kind": str,
    "format": str,
    "architecture": str,
    "encoder": str,
    "fold": int,
    "folds": int,
    "classes": list,
    "activation": str,
    "input": dict,
    "train_size": list,
    "val_metric": dict,
    "thresholds": dict,
}
#: kinds of model the kernel knows
MODEL_KINDS = ("segmenter", "classifier")
#: output heads per kind (``sigmoid`` is schema-1's name of ``sigmoid4``)
ACTIVATIONS = {"segmenter": ("sigmoid", "sigmoid4", "softmax5"), "classifier": ("binary", "multilabel")}

PathLike = str | os.PathLike


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest; ``extra`` keeps keys this version does not interpret (``epoch``, ``config``)."""

    name: str
    file: str
    sha256: str
    size: int
    kind: str
    format: str
    architecture: str
    encoder: str
    fold: int
    folds: int
    classes: list[int]
    activation: str
    input: dict[str, Any]
    train_size: list[int]
    val_metric: dict[str, Any]
    thresholds: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> ModelEntry:
        missing = [k for k in MODEL_FIELDS if k not in values]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        for key, kind in MODEL_FIELDS.items():
            if not isinstance(values[key], kind) or (kind is int and isinstance(values[key], bool)):
                raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {values[key]!r}")
        if values["kind"] not in MODEL_KINDS:
            raise ValueError(f"{where}: kind {values['kind']!r} is not one of {list(MODEL_KINDS)}")
        if values["format"] != "torchscript":
            raise ValueError(f"{where}: format {values['format']!r} is not 'torchscript'")
        classes = values["classes"]
        if not classes or sorted(set(classes)) != classes or not set(classes) <= set(CLASS_IDS):
            raise ValueError(f"{where}: classes {classes} must be sorted, distinct class ids from {list(CLASS_IDS)}")
        if values["activation"] not in ACTIVATIONS[values["kind"]]:
            raise ValueError(
                f"{where}: activation {values['activation']!r} of a {values['kind']} is not one of "
                f"{list(ACTIVATIONS[values['kind']])}"
            )
        for key in ("mean", "std", "scale"):
            if key not in values["input"]:
                raise ValueError(f"{where}: input is missing {key!r}")
        if len(values["sha256"]) != 64:
            raise ValueError(f"{where}: sha256 {values['sha256']!r} is not 64 hex digits")
        if Path(values["file"]).name != values["file"]:
            raise ValueError(f"{where}: file {values['file']!r} must be a bare file name beside the manifest")
        known = {k: values[k] for k in MODEL_FIELDS}
        extra = {k: v for k, v in values.items() if k not in MODEL_FIELDS}
        return cls(**known, extra=extra)

    @property
    def aux_head(self) -> bool:
        """A two-headed segmenter: its TorchScript returns ``(mask_logits, label_logits)``."""
        return bool(self.extra.get("aux_head", False))

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in MODEL_FIELDS}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest. ``folder`` is where its files live."""

    models: tuple[ModelEntry, ...]
    postprocess: dict[str, Any]
    files: dict[str, dict[str, Any]]
    image_size: tuple[int, int]
    folder: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def path_of(self, name: str) -> Path:
        return self.folder / name

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "steelkit_version": self.meta.get("steelkit_version", __version__),
            "created": self.meta.get("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
            "image_size": list(self.image_size),
            "postprocess": self.postprocess,
            "files": self.files,
            "models": [m.to_dict() for m in self.models],
        }


def load_manifest(path: PathLike) -> Manifest:
    """Load and validate a manifest.

    Raises:
        ValueError: not JSON, an unknown schema version, or a missing / mistyped field; names the file and the
            model entry.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the manifest must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is not supported (this steelkit reads {SCHEMA_VERSION})")
    for key, kind in (("models", list), ("postprocess", dict), ("files", dict), ("image_size", list)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} must be a {kind.__name__}")
    models = []
    for i, values in enumerate(data["models"]):
        if not isinstance(values, dict):
            raise ValueError(f"{path}: models[{i}] must be an object")
        models.append(ModelEntry.from_dict(values, f"{path}: models[{i}] ({values.get('name', '?')})"))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate model names {sorted({n for n in names if names.count(n) > 1})}")
    meta = {k: data[k] for k in ("steelkit_version", "created") if k in data}
    return Manifest(
        models=tuple(models),
        postprocess=data["postprocess"],
        files=data["files"],
        image_size=tuple(data["image_size"]),
        folder=path.parent,
        meta=meta,
    )


def save_manifest(manifest: Manifest, path: PathLike | None = None) -> Path:
    """Write the manifest as indented JSON, atomically (default: ``folder/weights_manifest.json``)."""
    path = Path(path) if path is not None else manifest.folder / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(manifest.to_dict(), handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def verify_files(manifest: Manifest) -> tuple[list[ModelEntry], list[str]]:
    """Check every model file and auxiliary file against its size and sha256.

    Returns:
        ``(good models, problems)``: models whose file exists and matches; one message per problem, naming the
        file and what is wrong. Auxiliary-file problems are reported but do not remove models.
    """
    good: list[ModelEntry] = []
    problems: list[str] = []

    def check(name: str, sha256: str, size: int) -> bool:
        path = manifest.path_of(name)
        if not path.is_file():
            problems.append(f"{path}: missing")
            return False
        actual_size = path.stat().st_size
        if actual_size != size:
            problems.append(f"{path}: size {actual_size} bytes, the manifest says {size} (truncated or replaced)")
            return False
        actual = sha256_file(path)
        if actual != sha256:
            problems.append(f"{path}: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}...")
            return False
        return True

    for entry in manifest.models:
        if check(entry.file, entry.sha256, entry.size):
            good.append(entry)
    for name, info in manifest.files.items():
        check(name, info.get("sha256", ""), info.get("size", -1))
    return good, problems
