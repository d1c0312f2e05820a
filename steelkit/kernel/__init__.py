"""The offline Kaggle kernel: locate inputs, verify and load TorchScript models, plan the time budget, predict,
search, pseudo-label, average, post-process, write. ``plan`` and ``report`` import no torch."""

from __future__ import annotations

from typing import Any

__all__ = ["KernelSettings", "run_kernel"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
