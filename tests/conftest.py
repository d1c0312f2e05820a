"""Shared fixtures: the real Severstal label files (read from ../shared/severstal, never copied into the repo)."""

from pathlib import Path

import pytest

#: where the real label files live in this workspace: <repo>/../shared/severstal
SHARED = Path(__file__).resolve().parents[2] / "shared" / "severstal"


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"real Severstal file {path} is absent (it lives outside the repo, in ../shared/severstal)")
    return path


@pytest.fixture
def real_file():
    return shared_file
