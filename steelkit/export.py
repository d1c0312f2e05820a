"""Export trained jobs to TorchScript and record them in ``weights_manifest.json``.

``torch.jit.script`` (not tracing) keeps train/eval behaviour, so the kernel can still fine-tune a loaded model and
BatchNorm follows ``.train()`` / ``.eval()``. Every exported file is checked against the eager model with
``torch.testing.assert_close`` after a save/load round trip. Each fold's ``final.pt`` is exported (the greedy
checkpoint average when it won, recorded with the epochs it came from).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .constants import CLASS_IDS
from .data import load_training_set
from .manifest import MANIFEST_NAME, Manifest, ModelEntry, save_manifest, sha256_file
from .models import build_model
from .plots import plot_search
from .search import DEFAULT_THRESHOLDS, area_grid, search_classes, search_postprocess, summarize
from .train import load_checkpoint

__all__ = ["export_run", "job_dirs", "oof_arrays", "script_model"]

#: input shape of the eager-vs-scripted check: small, non-square, divisible by 32
CHECK_SHAPE = (2, 3, 64, 192)


def script_model(model: torch.nn.Module, path: Path, check_shape: tuple[int, ...] = CHECK_SHAPE) -> None:
    """Script ``model``, save it to ``path``, reload it and compare it with eager on a random batch.

    Raises:
        AssertionError: the reloaded scripted model's output differs from eager (``assert_close``; tuples of
            ``(masks, labels)`` are compared element-wise).
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = torch.randn(check_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-4)


def job_dirs(run_dir: Path) -> list[Path]:
    """The job folders of a run: ``run_dir`` itself when it holds ``config.json``, else its sub-folders that do."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        return [run_dir]
    jobs = sorted(p.parent for p in run_dir.glob("*/config.json"))
    if not jobs:
        raise FileNotFoundError(f"{run_dir}: no config.json here or in a sub-folder; train first")
    return jobs


def _fold_dirs(job_dir: Path) -> list[tuple[int, Path]]:
    found = sorted(
        ((int(p.parent.name[4:]), p.parent) for p in job_dir.glob("fold*/final.pt")), key=lambda item: item[0]
    )
    if not found:
        raise FileNotFoundError(f"{job_dir}: no fold*/final.pt checkpoints; train first (or resume the run)")
    return found


def oof_arrays(job_dir: Path, data_dir: Path, folds: list[int], max_images: int | None = None, seed: int = 0):
    """Out-of-fold mask probabilities of a segmenter job with the matching truth at training resolution.

    Returns:
        ``(probs, truth, fold_of)``: ``(N, C, h, w)`` uint8 x 255 for the job's C classes, ``(N, 4, h, w)`` uint8
        {0, 1} of all classes, ``(N,)`` fold. At most ``max_images`` images, sampled at random (seeded).
    """
    job_dir = Path(job_dir)
    data = load_training_set(Path(data_dir))
    chunks = []
    for k in folds:
        ids = (job_dir / f"fold{k}" / "oof_ids.txt").read_text().split()
        chunks.append((k, ids, np.load(job_dir / f"fold{k}" / "oof.npy", mmap_mode="r")))
    total = sum(len(ids) for _, ids, _ in chunks)
    keep = np.arange(total)
    if max_images is not None and total > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_images, replace=False))
    probs, truth, fold_of = [], [], []
    offset = 0
    for k, ids, oof in chunks:
        local = keep[(keep >= offset) & (keep < offset + len(ids))] - offset
        offset += len(ids)
        probs.append(np.asarray(oof[local]))
        size = oof.shape[-2:]
        truth.append(
            np.stack([data.masks(ids[i], size) for i in local])
            if len(local)
            else np.zeros((0, 4) + size, dtype=np.uint8)
        )
        fold_of.append(np.full(len(local), k))
    return np.concatenate(probs), np.concatenate(truth), np.concatenate(fold_of)


def _copy_fold_file(job_dir: Path, out_dir: Path, files: dict) -> str:
    """Copy a job's ``folds.csv`` beside the manifest, sharing one file between jobs with the same assignment."""
    source = job_dir / "folds.csv"
    digest = sha256_file(source)
    for name, info in files.items():
        if info["sha256"] == digest:
            return name
    name = "folds.csv" if not files else f"folds-{job_dir.name}.csv"
    shutil.copyfile(source, out_dir / name)
    files[name] = {"sha256": digest, "size": (out_dir / name).stat().st_size}
    return name


def _fold_thresholds(probs: np.ndarray, truth: np.ndarray, area_scale: float) -> dict:
    """Per-class threshold and minimum area of one fold model from its out-of-fold probabilities (its classes only).

    Args:
        probs, truth: ``(N, C, h, w)`` for the model's C classes.
    """
    results = search_classes(probs, truth)
    return {
        "pixel_threshold": [r.threshold for r in results],
        "min_area": [int(round(r.min_area * area_scale)) for r in results],
        "search": summarize(results),
    }


def export_run(run_dir: Path, data_dir: Path, out_dir: Path | None = None, max_oof_images: int = 2000) -> Manifest:
    """Export every fold of every job of a run and write the manifest.

    Args:
        run_dir: a job folder written by :func:`steelkit.train.train`, or a recipe folder of job folders
            (:func:`steelkit.train.train_recipe`).
        data_dir: the competition folder the run trained on (for the out-of-fold truth of the threshold search).
        out_dir: where the ``.pt`` files, fold files and ``weights_manifest.json`` go (default ``run_dir/export``).
        max_oof_images: cap on the images used by the default-threshold search.

    Returns:
        The written manifest. Segmenters get per-fold ``thresholds`` from that fold's out-of-fold search,
        classifiers per-label thresholds from validation; the manifest's ``postprocess`` comes from the search over
        the out-of-fold probabilities of the first 4-class segmenter job (the kernel searches again on its own
        ensemble).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[ModelEntry] = []
    files: dict[str, dict] = {}
    image_size = None
    ensemble_search = None
    for job_dir in job_dirs(run_dir):
        cfg = TrainConfig.from_dict(json.loads((job_dir / "config.json").read_text()))
        fold_file = _copy_fold_file(job_dir, out_dir, files)
        fold_dirs = _fold_dirs(job_dir)
        folds = [k for k, _ in fold_dirs]
        segmenter = cfg.model.kind == "segmenter"
        if segmenter:
            probs, truth, fold_of = oof_arrays(job_dir, data_dir, folds, max_oof_images)
            truth = truth[:, [c - 1 for c in cfg.model.classes]]
            area_scale = 1.0 / cfg.data.scale**2
        for fold, fold_dir in fold_dirs:
            ckpt = load_checkpoint(fold_dir / "final.pt")
            image_size = ckpt["image_shape"]
            model = build_model(dataclasses.replace(cfg.model, encoder_weights=None))  # weights come from the file
            model.load_state_dict(ckpt["state_dict"])
            name = f"{cfg.name}-fold{fold}"
            file = out_dir / f"{name}.pt"
            script_model(model, file)
            if segmenter:
                thresholds = _fold_thresholds(probs[fold_of == fold], truth[fold_of == fold], area_scale)
            else:
                thresholds = {"label_threshold": ckpt["metric"].get("label_thresholds", [])}
            entries.append(
                ModelEntry(
                    name=name,
                    file=file.name,
                    sha256=sha256_file(file),
                    size=file.stat().st_size,
                    kind=cfg.model.kind,
                    format="torchscript",
                    architecture=cfg.model.arch,
                    encoder=cfg.model.encoder,
                    fold=fold,
                    folds=cfg.data.folds,
                    classes=list(cfg.model.classes),
                    activation=cfg.model.head,
                    input={
                        "channels": 3,
                        "mean": list(cfg.data.mean),
                        "std": list(cfg.data.std),
                        "scale": cfg.data.scale,
                    },
                    train_size=list(ckpt["train_size"]),
                    val_metric=ckpt["metric"],
                    thresholds=thresholds,
                    extra={
                        "job": cfg.name,
                        "fold_file": fold_file,
                        "epoch": ckpt["epoch"],
                        "aux_head": cfg.model.aux_head,
                        "averaged_from": ckpt.get("averaged_from", [ckpt["epoch"]]),
                        "encoder_weights_used": ckpt.get("encoder_weights_used"),
                        "config": ckpt["config"],
                    },
                )
            )
            print(
                f"exported {file.name}: {cfg.model.kind} {file.stat().st_size / 1e6:.1f} MB, "
                f"val {ckpt['metric']['name']} {ckpt['metric']['value']:.4f}"
            )
        if segmenter and ensemble_search is None and tuple(cfg.model.classes) == CLASS_IDS:
            ensemble_search = (probs, truth, area_scale)
    postprocess: dict = {"pixel_threshold": [0.5] * 4, "min_area": [0] * 4, "min_component": [0] * 4}
    postprocess["source"] = "defaults: no 4-class segmenter to search on"
    summary = ""
    if ensemble_search is not None:
        probs, truth, area_scale = ensemble_search
        settings, results = search_postprocess(probs, truth, area_scale)
        plot_search(
            results, DEFAULT_THRESHOLDS, area_grid(probs.shape[-2:]), out_dir / "threshold_search.png", area_scale
        )
        postprocess = settings.to_dict()
        postprocess["source"] = f"out-of-fold search over {len(probs)} train images"
        postprocess["search"] = summarize(results)
        before, after = np.mean([r.baseline for r in results]), np.mean([r.dice for r in results])
        summary = (
            f"; OOF Dice {before:.4f} at 0.5 -> {after:.4f} with thresholds {settings.pixel_threshold} and min areas "
            f"{settings.min_area}; curves in {out_dir / 'threshold_search.png'}"
        )
    manifest = Manifest(
        models=tuple(entries),
        postprocess=postprocess,
        files=files,
        image_size=tuple(image_size),
        folder=out_dir,
    )
    save_manifest(manifest, out_dir / MANIFEST_NAME)
    print(f"exported {len(entries)} models to {out_dir} in {time.perf_counter() - start:.1f} s{summary}")
    return manifest
