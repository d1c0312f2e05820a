"""The training loop: K folds, AMP on CUDA, best checkpoint per fold by validation Dice, out-of-fold probabilities.

Output layout of a run folder::

    RUNS/
      config.json            the TrainConfig
      folds.csv              ImageId,fold for every train image
      fold{k}/best.pt        {"state_dict", "config", "fold", "epoch", "metric", "image_shape", ...}
      fold{k}/metrics.csv    one row per epoch
      fold{k}/oof.npy        (n, 4, h, w) uint8 probabilities x 255 of the held-out images, training resolution
      fold{k}/oof_ids.txt    the held-out image ids, in oof.npy order
      summary.json           per-fold best epoch and Dice, timings
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import __version__
from .config import OptimConfig, TrainConfig
from .csvio import write_csv_atomic
from .data import SteelDataset, TrainingSet, assign_folds, folds_frame, load_training_set
from .losses import bce_dice_loss
from .metric import dice_from_areas
from .models import build_segmenter
from .search import area_grid, best_of_table, class_counts, table_from_counts
from .tensors import normalize, to_uint8

__all__ = ["load_checkpoint", "predict_probs", "save_checkpoint", "seed_everything", "train", "train_fold"]


def seed_everything(seed: int) -> None:
    """The one place randomness is seeded: Python, numpy's global state (for third-party code) and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def save_checkpoint(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: an interruption never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _loader(dataset: SteelDataset, cfg: TrainConfig, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=shuffle,
        num_workers=cfg.data.num_workers,
        drop_last=shuffle and len(dataset) > cfg.data.batch_size,
        generator=generator,
        persistent_workers=cfg.data.num_workers > 0,
    )


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device, progress: bool):
    """Yield ``(probabilities, masks)`` per batch: ``(B, 4, h, w)`` float32 on the CPU and the uint8 truth."""
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    for images, masks in _progress(loader, progress, desc="validate", leave=False):
        x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
        with amp:
            logits = model(x)
        yield torch.sigmoid(logits.float()).cpu(), masks


#: pixel thresholds at which validation Dice is measured every epoch
VAL_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _validate(model, loader, cfg, device, progress) -> dict:
    """Competition Dice (empty-empty = 1) of the held-out images, as the kernel will score them.

    Every class is scored at its best pixel threshold (:data:`VAL_THRESHOLDS`) and whole-mask minimum area
    (:data:`steelkit.search.DEFAULT_AREA_FRACTIONS`), from pixel counts accumulated batch by batch.

    Returns:
        ``{"dice", "per_class", "thresholds", "min_areas", "dice_at_0.5"}``: ``dice`` (the checkpoint is selected on
        it) is the mean over classes of each class's post-processed Dice; ``dice_at_0.5`` is the plain Dice at 0.5.
    """
    inter, pred_area, truth_area = [], [], []
    for probs, masks in predict_probs(model, loader, cfg, device, progress):
        counts = [class_counts(probs[:, c].numpy(), masks[:, c].numpy(), VAL_THRESHOLDS) for c in range(probs.shape[1])]
        inter.append(np.stack([i for i, _, _ in counts], axis=-1))  # (T, B, 4)
        pred_area.append(np.stack([p for _, p, _ in counts], axis=-1))
        truth_area.append(np.stack([t for _, _, t in counts], axis=-1))  # (B, 4)
        size = tuple(masks.shape[-2:])
    inter, pred_area, truth_area = (np.concatenate(x, axis=-2) for x in (inter, pred_area, truth_area))
    min_areas = area_grid(size)
    per_class, thresholds, areas = [], [], []
    for c in range(truth_area.shape[1]):
        table = table_from_counts(inter[:, :, c], pred_area[:, :, c], truth_area[:, c], min_areas)
        t, a = best_of_table(table)
        per_class.append(float(table[t, a]))
        thresholds.append(VAL_THRESHOLDS[t])
        areas.append(min_areas[a])
    at_half = VAL_THRESHOLDS.index(0.5)
    return {
        "dice": float(np.mean(per_class)),
        "per_class": per_class,
        "thresholds": thresholds,
        "min_areas": areas,
        "dice_at_0.5": float(dice_from_areas(inter[at_half], pred_area[at_half], truth_area).mean()),
    }


def lr_factor(cfg: OptimConfig, total_steps: int):
    """The multiplier of ``cfg.lr`` at each optimiser step, for ``LambdaLR``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_fold(
    cfg: TrainConfig,
    data: TrainingSet,
    folds: np.ndarray,
    fold: int,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Train one fold; keep the best checkpoint by validation Dice; write its out-of-fold probabilities.

    Returns:
        ``{"fold", "best_epoch", "best_dice", "per_class", "seconds"}``.
    """
    start = time.perf_counter()
    fold_dir = Path(out_dir) / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed * 1000 + fold
    seed_everything(seed)
    ids = np.asarray(data.image_ids)
    train_ids, val_ids = ids[folds != fold].tolist(), ids[folds == fold].tolist()
    train_set = SteelDataset(data, train_ids, cfg.data, train=True, seed=seed)
    val_set = SteelDataset(data, val_ids, cfg.data, train=False)
    train_loader = _loader(train_set, cfg, shuffle=True, seed=seed)
    val_loader = _loader(val_set, cfg, shuffle=False, seed=seed)

    model = build_segmenter(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    steps = (
        len(train_loader) if cfg.optim.steps_per_epoch is None else min(cfg.optim.steps_per_epoch, len(train_loader))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps * cfg.optim.epochs))
    best = {"dice": -1.0, "epoch": -1, "per_class": []}
    rows = []
    for epoch in range(cfg.optim.epochs):
        model.train()
        train_set.set_epoch(epoch)
        losses = []
        bar = _progress(train_loader, progress, total=steps, desc=f"fold {fold} epoch {epoch + 1}/{cfg.optim.epochs}")
        for step, (images, masks) in enumerate(bar):
            if step >= steps:
                break
            x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
            y = masks.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                logits = model(x)
            loss = bce_dice_loss(logits, y, cfg.loss.bce_weight, cfg.loss.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            if progress:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        val = _validate(model, val_loader, cfg, device, progress)
        dice, per_class = val["dice"], val["per_class"]
        rows.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "val_dice": dice,
                "val_dice_at_0.5": val["dice_at_0.5"],
                **{f"val_dice_{c + 1}": d for c, d in enumerate(per_class)},
                **{f"val_threshold_{c + 1}": t for c, t in enumerate(val["thresholds"])},
                **{f"val_min_area_{c + 1}": a for c, a in enumerate(val["min_areas"])},
            }
        )
        write_csv_atomic(pd.DataFrame(rows), fold_dir / "metrics.csv")
        if dice > best["dice"]:
            best = {"dice": dice, "epoch": epoch, "per_class": per_class}
            save_checkpoint(
                {
                    "state_dict": model.state_dict(),
                    "config": cfg.to_dict(),
                    "fold": fold,
                    "epoch": epoch,
                    "metric": {"name": "dice_postprocessed", "value": dice, **val},
                    "image_shape": list(data.shape),
                    "train_size": list(val_set.size),
                    "steelkit_version": __version__,
                },
                fold_dir / "best.pt",
            )
        if progress:
            print(
                f"fold {fold} epoch {epoch + 1}: loss {np.mean(losses):.4f} "
                f"val Dice {dice:.4f} (best {best['dice']:.4f})"
            )

    # out-of-fold probabilities of the best checkpoint, streamed to a uint8 memory map
    model.load_state_dict(load_checkpoint(fold_dir / "best.pt")["state_dict"])
    oof = np.lib.format.open_memmap(
        fold_dir / "oof.npy", mode="w+", dtype=np.uint8, shape=(len(val_ids), 4) + val_set.size
    )
    offset = 0
    for probs, _ in predict_probs(model, val_loader, cfg, device, progress):
        oof[offset : offset + len(probs)] = to_uint8(probs).numpy()
        offset += len(probs)
    oof.flush()
    del oof
    (fold_dir / "oof_ids.txt").write_text("\n".join(val_ids) + "\n")
    return {
        "fold": fold,
        "best_epoch": best["epoch"],
        "best_dice": best["dice"],
        "per_class": best["per_class"],
        "seconds": time.perf_counter() - start,
    }


def train(
    cfg: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    device: str | None = None,
    folds_to_train: Sequence[int] | None = None,
    progress: bool = True,
) -> dict:
    """Train every fold of ``cfg`` on the competition folder ``data_dir``; write the run to ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_training_set(Path(data_dir))
    folds = assign_folds(data.flags, cfg.data.folds, cfg.seed)
    write_csv_atomic(folds_frame(data.image_ids, folds), out_dir / "folds.csv")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    results = [
        train_fold(cfg, data, folds, k, out_dir, device_, progress)
        for k in (folds_to_train if folds_to_train is not None else cfg.data.fold_ids)
    ]
    summary = {
        "name": cfg.name,
        "device": str(device_),
        "images": len(data.image_ids),
        "folds": results,
        "mean_dice": float(np.mean([r["best_dice"] for r in results])),
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"trained {cfg.name}: {len(results)} folds on {len(data.image_ids)} images, "
        f"val Dice {summary['mean_dice']:.4f}, {summary['seconds']:.0f} s on {device_}"
    )
    return summary
