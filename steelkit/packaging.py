"""Pack the steelkit wheel, the TorchScript weights and the manifest into a folder for ``kaggle datasets create``.

Nothing is written half: the folder is assembled in a temporary sibling, every sha256 is checked on the copies,
and only then is it renamed to the destination.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .manifest import MANIFEST_NAME, load_manifest, verify_files

__all__ = ["build_dataset", "build_wheel", "project_root", "validate_dataset_id"]

#: Kaggle dataset slug: 3 to 50 characters, lowercase letters, digits and single hyphens, no hyphen at an end
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,49}$")
#: Kaggle user names: letters, digits, hyphens and underscores
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")


def validate_dataset_id(dataset_id: str, title: str) -> None:
    """Raise ``ValueError`` when the Kaggle API would reject ``owner/slug`` or the title (6 to 50 characters)."""
    owner, sep, slug = dataset_id.partition("/")
    if not sep or not OWNER_RE.match(owner) or not SLUG_RE.match(slug):
        raise ValueError(
            f"dataset id {dataset_id!r} is not 'owner/slug' with a slug of 3-50 lowercase letters, digits and "
            "hyphens (no hyphen at either end, none doubled)"
        )
    if not 6 <= len(title) <= 50:
        raise ValueError(f"dataset title {title!r} must be 6 to 50 characters (Kaggle's rule)")


def project_root() -> Path:
    """The source checkout steelkit runs from (the folder holding ``setup.py``)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():
        raise FileNotFoundError(
            f"{root} has no setup.py: building the wheel needs a source checkout of steelkit (pip install -e .)"
        )
    return root


def build_wheel(project: Path, out_dir: Path) -> Path:
    """Build the steelkit wheel from ``project`` into ``out_dir`` with pip, offline (no build isolation)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "--wheel-dir",
        str(out_dir),
        str(project),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the wheel failed ({' '.join(command)}):\n{result.stdout}\n{result.stderr}")
    wheels = sorted(Path(out_dir).glob("steelkit-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one steelkit wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def build_dataset(
    manifest_path: Path,
    out_dir: Path,
    dataset_id: str,
    title: str | None = None,
    license_name: str = "CC0-1.0",
    project: Path | None = None,
) -> dict:
    """Assemble the Kaggle dataset folder.

    Args:
        manifest_path: ``weights_manifest.json`` written by ``steelkit export``; its files lie beside it.
        out_dir: the folder to create (replaced when it exists).
        dataset_id: ``owner/slug`` as the Kaggle API expects.
        title: dataset title (default: the slug).
        license_name: a Kaggle license name.
        project: the steelkit source checkout to build the wheel from (default: this one).

    Returns:
        ``{"folder", "files": {name: bytes}, "bytes"}``.

    Raises:
        ValueError: a bad dataset id or title, a manifest that does not validate, or a weight file that is missing
            or does not match its sha256 (every problem listed). Nothing is left at ``out_dir``.
    """
    manifest_path = Path(manifest_path)
    out_dir = Path(out_dir)
    title = title or dataset_id.partition("/")[2]
    validate_dataset_id(dataset_id, title)
    manifest = load_manifest(manifest_path)
    if not manifest.models:
        raise ValueError(f"{manifest_path}: no models to pack")
    good, problems = verify_files(manifest)
    if problems:
        raise ValueError(f"{manifest_path}: the manifest disagrees with its files:\n  " + "\n  ".join(problems))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build_wheel(project or project_root(), staging)
        for name in [m.file for m in manifest.models] + list(manifest.files):
            shutil.copyfile(manifest.path_of(name), staging / name)
        shutil.copyfile(manifest_path, staging / MANIFEST_NAME)
        _, problems = verify_files(load_manifest(staging / MANIFEST_NAME))
        if problems:
            raise ValueError("copies do not match the manifest:\n  " + "\n  ".join(problems))
        metadata = {"title": title, "id": dataset_id, "licenses": [{"name": license_name}]}
        (staging / "dataset-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    total = sum(files.values())
    for name, size in files.items():
        print(f"  {size / 1e6:9.2f} MB  {name}")
    print(
        f"dataset folder {out_dir}: {len(files)} files, {total / 1e6:.2f} MB; next: kaggle datasets create -p {out_dir}"
    )
    return {"folder": str(out_dir), "files": files, "bytes": total}
