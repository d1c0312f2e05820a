"""Find the competition data and the steelkit dataset under ``/kaggle/input`` by marker files, not by slug.

Kaggle mounts inputs as ``/kaggle/input/<slug>/`` (classic) or nested deeper (``/kaggle/input/competitions/<slug>``,
``/kaggle/input/datasets/<owner>/<slug>/<version>``); both are searched, a few levels deep.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..constants import SAMPLE_SUBMISSION_CSV, TEST_IMAGES
from ..manifest import MANIFEST_NAME

__all__ = ["describe_tree", "find_competition", "find_dataset", "find_dirs"]

#: how deep below the input root markers are looked for
MAX_DEPTH = 6


def find_dirs(root: Path, predicate: Callable[[Path], bool], max_depth: int = MAX_DEPTH) -> list[Path]:
    """Folders under ``root`` (itself included) for which ``predicate`` holds, shallowest first, sorted."""
    root = Path(root)
    found = []
    for current, dirs, _ in os.walk(root, followlinks=True):
        depth = len(Path(current).relative_to(root).parts)
        if predicate(Path(current)):
            found.append(Path(current))
        if depth >= max_depth:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != TEST_IMAGES and d != "train_images")
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def describe_tree(root: Path, depth: int = 2, limit: int = 30) -> str:
    """A short listing of what is under ``root``, for error messages."""
    root = Path(root)
    if not root.exists():
        return f"{root} does not exist"
    entries = []
    for current, dirs, files in os.walk(root, followlinks=True):
        rel = Path(current).relative_to(root)
        if len(rel.parts) >= depth:
            dirs[:] = []
        dirs.sort()
        entries += [str(rel / d) + "/" for d in dirs] + [str(rel / f) for f in sorted(files)[:5]]
    return ", ".join(entries[:limit]) + (" ..." if len(entries) > limit else "") if entries else "nothing"


def _is_competition(path: Path) -> bool:
    return (path / SAMPLE_SUBMISSION_CSV).is_file() and (path / TEST_IMAGES).is_dir()


def _is_dataset(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def _find_one(root: Path, predicate: Callable[[Path], bool], what: str) -> Path:
    found = find_dirs(root, predicate)
    if not found:
        raise FileNotFoundError(f"no {what} under {root}; found: {describe_tree(root)}")
    return found[0]


def find_competition(root: Path) -> Path:
    """The folder with ``sample_submission.csv`` and ``test_images/``; ``FileNotFoundError`` lists what was found."""
    return _find_one(root, _is_competition, f"competition folder ({SAMPLE_SUBMISSION_CSV} + {TEST_IMAGES}/)")


def find_dataset(root: Path) -> Path:
    """The folder with ``weights_manifest.json``; ``FileNotFoundError`` lists what was found."""
    return _find_one(root, _is_dataset, f"steelkit dataset ({MANIFEST_NAME})")
