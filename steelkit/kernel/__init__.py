"""The offline Kaggle kernel: locate inputs, verify and load TorchScript models, predict, post-process, write."""

from .pipeline import KernelSettings, run_kernel

__all__ = ["KernelSettings", "run_kernel"]
