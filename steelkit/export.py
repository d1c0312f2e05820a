"""Export trained folds to TorchScript and record them in ``weights_manifest.json``.

``torch.jit.script`` (not tracing) keeps train/eval behaviour, so the kernel can still fine-tune a loaded model and
BatchNorm follows ``.train()`` / ``.eval()``. Every exported file is checked against the eager model with
``torch.testing.assert_close`` after a save/load round trip.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import load_training_set
from .manifest import MANIFEST_NAME, Manifest, ModelEntry, save_manifest, sha256_file
from .models import build_segmenter
from .plots import plot_search
from .search import DEFAULT_THRESHOLDS, area_grid, search_postprocess, summarize
from .train import load_checkpoint

__all__ = ["export_run", "oof_arrays", "script_model"]

#: input shape of the eager-vs-scripted check: small, non-square, divisible by 32
CHECK_SHAPE = (2, 3, 64, 192)


def script_model(model: torch.nn.Module, path: Path, check_shape: tuple[int, ...] = CHECK_SHAPE) -> None:
    """Script ``model``, save it to ``path``, reload it and compare it with eager on a random batch.

    Raises:
        AssertionError: the reloaded scripted model's output differs from eager (``assert_close``).
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = torch.randn(check_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-4)


def oof_arrays(run_dir: Path, data_dir: Path, folds: list[int], max_images: int | None = None, seed: int = 0):
    """Out-of-fold probabilities of a run with the matching truth at training resolution.

    Returns:
        ``(probs, truth, fold_of)``: ``(N, 4, h, w)`` uint8 x 255, ``(N, 4, h, w)`` uint8 {0, 1}, ``(N,)`` fold.
        At most ``max_images`` images, sampled evenly at random (seeded).
    """
    run_dir = Path(run_dir)
    data = load_training_set(Path(data_dir))
    chunks = []
    for k in folds:
        ids = (run_dir / f"fold{k}" / "oof_ids.txt").read_text().split()
        chunks.append((k, ids, np.load(run_dir / f"fold{k}" / "oof.npy", mmap_mode="r")))
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
        truth.append(np.stack([data.masks(ids[i], oof.shape[-2:]) for i in local]) if len(local) else oof[:0])
        fold_of.append(np.full(len(local), k))
    return np.concatenate(probs), np.concatenate(truth), np.concatenate(fold_of)


def export_run(run_dir: Path, data_dir: Path, out_dir: Path | None = None, max_oof_images: int = 2000) -> Manifest:
    """Export every fold of a run and write the manifest.

    Args:
        run_dir: a folder written by :func:`steelkit.train.train`.
        data_dir: the competition folder the run trained on (for the out-of-fold truth of the threshold search).
        out_dir: where the ``.pt`` files, ``folds.csv`` and ``weights_manifest.json`` go (default ``run_dir/export``).
        max_oof_images: cap on the images used by the default-threshold search.

    Returns:
        The written manifest. Per model, ``thresholds`` come from that fold's out-of-fold search; the manifest's
        ``postprocess`` from the search over all folds' out-of-fold probabilities (what the ensemble applies).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = sorted(run_dir.glob("fold*/best.pt"), key=lambda p: int(p.parent.name[4:]))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no fold*/best.pt checkpoints; train first")
    shutil.copyfile(run_dir / "folds.csv", out_dir / "folds.csv")
    folds = [int(p.parent.name[4:]) for p in checkpoints]
    probs, truth, fold_of = oof_arrays(run_dir, data_dir, folds, max_oof_images)

    entries = []
    image_size = None
    for path, fold in zip(checkpoints, folds):
        ckpt = load_checkpoint(path)
        cfg = TrainConfig.from_dict(ckpt["config"])
        image_size = ckpt["image_shape"]
        model = build_segmenter(cfg.model)
        model.load_state_dict(ckpt["state_dict"])
        name = f"{cfg.name}-fold{fold}"
        file = out_dir / f"{name}.pt"
        script_model(model, file)
        area_scale = 1.0 / cfg.data.scale**2
        settings, _ = search_postprocess(probs[fold_of == fold], truth[fold_of == fold], area_scale)
        entries.append(
            ModelEntry(
                name=name,
                file=file.name,
                sha256=sha256_file(file),
                size=file.stat().st_size,
                kind="segmenter",
                format="torchscript",
                architecture=cfg.model.arch,
                encoder=cfg.model.encoder,
                fold=fold,
                folds=cfg.data.folds,
                classes=[1, 2, 3, 4],
                activation=cfg.model.activation,
                input={"channels": 3, "mean": list(cfg.data.mean), "std": list(cfg.data.std), "scale": cfg.data.scale},
                train_size=list(ckpt["train_size"]),
                val_metric=ckpt["metric"],
                thresholds=settings.to_dict(),
                extra={"fold_file": "folds.csv", "epoch": ckpt["epoch"], "config": ckpt["config"]},
            )
        )
        print(f"exported {file.name}: {file.stat().st_size / 1e6:.1f} MB, val Dice {ckpt['metric']['value']:.4f}")
    settings, results = search_postprocess(probs, truth, area_scale)
    plot_search(results, DEFAULT_THRESHOLDS, area_grid(probs.shape[-2:]), out_dir / "threshold_search.png", area_scale)
    postprocess = settings.to_dict()
    postprocess["source"] = f"out-of-fold search over {len(probs)} train images"
    postprocess["search"] = summarize(results)
    manifest = Manifest(
        models=tuple(entries),
        postprocess=postprocess,
        files={
            "folds.csv": {"sha256": sha256_file(out_dir / "folds.csv"), "size": (out_dir / "folds.csv").stat().st_size}
        },
        image_size=tuple(image_size),
        folder=out_dir,
    )
    save_manifest(manifest, out_dir / MANIFEST_NAME)
    before = np.mean([r.baseline for r in results])
    after = np.mean([r.dice for r in results])
    print(
        f"exported {len(entries)} models to {out_dir} in {time.perf_counter() - start:.1f} s; "
        f"OOF Dice {before:.4f} at 0.5 -> {after:.4f} with searched thresholds {settings.pixel_threshold} "
        f"and min areas {settings.min_area}; curves in {out_dir / 'threshold_search.png'}"
    )
    return manifest
