"""The training loop: K folds of every job of a recipe, through one code path for segmenters and classifiers.

AMP on CUDA, gradient accumulation, Adam/AdamW/SGD/RAdam, cosine-with-warm-up or ReduceLROnPlateau, early stopping,
validation Dice per class every epoch, top-k checkpoints, resume after an interruption (identical to an uninterrupted
run on the CPU), greedy checkpoint averaging, DistributedDataParallel under ``torchrun``, out-of-fold probabilities.

Output layout of a job folder (a recipe writes one per job, ``OUT/<job name>/``)::

    JOB/
      config.json            the TrainConfig
      folds.csv              ImageId,fold for every train image
      fold{k}/last.pt        everything needed to resume (model, optimiser, scheduler, RNG, history); deleted once
                             the fold is complete
      fold{k}/fold_summary.json   the fold's result; marks it complete
      fold{k}/best.pt        {"state_dict", "config", "fold", "epoch", "metric", "image_shape", ...}
      fold{k}/top{i}.pt      the i-th best epoch when optim.top_k > 1
      fold{k}/averaged.pt    the greedy average of the top-k (averaging.greedy), same keys + "averaged_from"
      fold{k}/final.pt       the checkpoint exported: averaged.pt when it scored at least best.pt, else best.pt
      fold{k}/metrics.csv    one row per epoch (also metrics.json)
      fold{k}/oof.npy        segmenters: (n, C, h, w) uint8 probabilities x 255 of the held-out images
      fold{k}/oof_labels.npy classifiers and two-headed models: (n, L) float16 label probabilities
      fold{k}/oof_ids.txt    the held-out image ids, in oof order
      summary.json           per-fold best epoch and metric, timings
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import __version__
from .averaging import cpu_state_dict
from .config import ModelConfig, OptimConfig, Recipe, TrainConfig
from .constants import TRAIN_CSV
from .csvio import write_csv_atomic
from .data import SteelDataset, TrainingSet, assign_folds, build_sampler, folds_frame, load_training_set
from .losses import build_loss
from .metric import dice_from_areas
from .models import (
    build_model_with_info,
    check_model_config,
    label_probabilities,
    label_targets,
    mask_probabilities,
    split_outputs,
)
from .search import area_grid, best_of_table, class_counts, table_from_counts
from .tensors import normalize, to_uint8

__all__ = [
    "DistInfo",
    "build_optimizer",
    "load_checkpoint",
    "lr_factor",
    "predict_probs",
    "save_checkpoint",
    "seed_everything",
    "train",
    "train_fold",
    "train_recipe",
]


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


@dataclass(frozen=True)
class DistInfo:
    """Process group facts under ``torchrun`` (``world_size`` 1 otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` (explicit registry)."""
    builders = {
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "adamw": lambda: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        "radam": lambda: torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    }
    if cfg.optimizer not in builders:
        raise KeyError(f"unknown optimizer {cfg.optimizer!r}; valid: {sorted(builders)}")
    return builders[cfg.optimizer]()


def lr_factor(cfg: OptimConfig, total_steps: int):
    """The multiplier of ``cfg.lr`` at each optimiser step, for ``LambdaLR`` (warm-up, then constant or cosine;
    ``plateau`` keeps 1 after warm-up and lets ReduceLROnPlateau scale the rate)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule != "cosine":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _Schedule:
    """Per-step LambdaLR (warm-up / cosine) times a ReduceLROnPlateau scale stepped per epoch on validation Dice."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.factor = lr_factor(cfg, total_steps)
        self.step_count = 0
        self.scale = 1.0
        self.best = -math.inf
        self.bad = 0
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.step_count) * self.scale
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def epoch_end(self, metric: float) -> None:
        if self.cfg.schedule != "plateau":
            return
        if metric > self.best + 1e-4:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
            if self.bad > self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
                self.bad = 0
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.scale, self.best, self.bad = (state[k] for k in ("step_count", "scale", "best", "bad"))
        self._apply()


def _val_loader(dataset: SteelDataset, cfg: TrainConfig) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def _train_loader(dataset: SteelDataset, sampler, cfg: TrainConfig) -> DataLoader:
    # not persistent: workers are re-forked each epoch and so see the dataset's epoch (crop size, seeds)
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=len(sampler) > cfg.data.batch_size,
    )


def _class_index(cfg: TrainConfig) -> list[int]:
    return [c - 1 for c in cfg.model.classes]


def _label_targets(masks: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    return label_targets(masks, model.head, model.classes)


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device, progress: bool
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
    """Yield ``(mask_probs, label_probs, masks)`` per batch on the CPU.

    ``mask_probs`` is ``(B, C, h, w)`` float32 for the model's classes (``None`` for classifiers); ``label_probs`` is
    ``(B, L)`` (``None`` for plain segmenters); ``masks`` the uint8 truth of all 4 classes.
    """
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" and cfg.optim.amp else nullcontext()
    for images, masks in _progress(loader, progress, desc="validate", leave=False):
        x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
        with amp:
            mask_logits, label_logits = split_outputs(model(x))
        mask_probs = None if mask_logits is None else mask_probabilities(mask_logits, cfg.model.head).cpu()
        label_probs = None if label_logits is None else label_probabilities(label_logits).cpu()
        yield mask_probs, label_probs, masks


#: pixel thresholds at which validation Dice is measured every epoch
VAL_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _validate(model, loader, cfg: TrainConfig, device, progress) -> dict:
    """Validation metrics of the held-out images, as the kernel will score them.

    Segmenters: competition Dice (empty-empty = 1) of each of the model's classes at its best pixel threshold
    (:data:`VAL_THRESHOLDS`) and whole-mask minimum area (:data:`steelkit.search.DEFAULT_AREA_FRACTIONS`), from pixel
    counts accumulated batch by batch; also the plain Dice at 0.5 and the mean IoU at 0.5. Classifiers: per label the
    best accuracy over :data:`VAL_THRESHOLDS` (the gate's accuracy), and ROC AUC where both labels occur.

    Returns:
        ``{"name", "value", "per_class", ...}``; checkpoints are ranked on ``value``.
    """
    idx = _class_index(cfg)
    inter, pred_area, truth_area, labels, label_truth = [], [], [], [], []
    size = None
    for probs, label_probs, masks in predict_probs(model, loader, cfg, device, progress):
        truth = masks[:, idx].numpy()
        if probs is not None:
            counts = [class_counts(probs[:, c].numpy(), truth[:, c], VAL_THRESHOLDS) for c in range(probs.shape[1])]
            inter.append(np.stack([i for i, _, _ in counts], axis=-1))  # (T, B, C)
            pred_area.append(np.stack([p for _, p, _ in counts], axis=-1))
            truth_area.append(np.stack([t for _, _, t in counts], axis=-1))  # (B, C)
            size = tuple(masks.shape[-2:])
        if label_probs is not None:
            labels.append(label_probs.numpy())
            label_truth.append(_label_targets(masks, cfg.model).numpy())
    out: dict = {}
    if labels:
        out.update(_label_metrics(np.concatenate(labels), np.concatenate(label_truth)))
    if not inter:
        return {"name": "label_accuracy", "value": out["label_accuracy"], "per_class": out["label_per_class"], **out}
    inter, pred_area, truth_area = (np.concatenate(x, axis=-2) for x in (inter, pred_area, truth_area))
    min_areas = area_grid(size)
    per_class, thresholds, areas = [], [], []
    for c in range(truth_area.shape[1]):
        table = table_from_counts(inter[:, :, c], pred_area[:, :, c], truth_area[:, c], min_areas)
        t, a = best_of_table(table)
        per_class.append(float(table[t, a]))
        thresholds.append(VAL_THRESHOLDS[t])
        areas.append(min_areas[a])
    half = VAL_THRESHOLDS.index(0.5)
    union = pred_area[half] + truth_area - inter[half]
    iou = np.where(union > 0, inter[half] / np.maximum(union, 1), 1.0)
    out.update(
        {
            "name": "dice_postprocessed",
            "value": float(np.mean(per_class)),
            "per_class": per_class,
            "thresholds": thresholds,
            "min_areas": areas,
            "dice_at_0.5": float(dice_from_areas(inter[half], pred_area[half], truth_area).mean()),
            "iou_at_0.5": float(iou.mean()),
        }
    )
    return out


def _label_metrics(probs: np.ndarray, truth: np.ndarray) -> dict:
    """Per label: best accuracy over :data:`VAL_THRESHOLDS` and ROC AUC (NaN when only one label value occurs)."""
    from sklearn.metrics import roc_auc_score

    accuracy, thresholds, auc = [], [], []
    for j in range(probs.shape[1]):
        acc = [float(((probs[:, j] >= t) == (truth[:, j] > 0)).mean()) for t in VAL_THRESHOLDS]
        best = int(np.argmax(acc))
        accuracy.append(acc[best])
        thresholds.append(VAL_THRESHOLDS[best])
        both = 0 < truth[:, j].sum() < len(truth)
        auc.append(float(roc_auc_score(truth[:, j], probs[:, j])) if both else float("nan"))
    return {
        "label_accuracy": float(np.mean(accuracy)),
        "label_per_class": accuracy,
        "label_thresholds": thresholds,
        "label_auc": auc,
    }


def _checkpoint_payload(model, cfg, fold, epoch, metric, data: TrainingSet, val_set: SteelDataset, weights) -> dict:
    return {
        "state_dict": cpu_state_dict(_unwrap(model)),
        "config": cfg.to_dict(),
        "fold": fold,
        "epoch": epoch,
        "metric": metric,
        "image_shape": list(data.shape),
        "train_size": list(val_set.size),
        "encoder_weights_used": weights,
        "steelkit_version": __version__,
    }


def _sync_buffers(model: torch.nn.Module, dist_info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks validate and save the same model."""
    if dist_info.world_size > 1:
        import torch.distributed as dist

        for buffer in _unwrap(model).buffers():
            dist.broadcast(buffer, 0)


def train_fold(
    cfg: TrainConfig,
    data: TrainingSet,
    folds: np.ndarray,
    fold: int,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
    resume: bool = True,
    dist_info: DistInfo = DistInfo(),
    stop_after_epochs: int | None = None,
) -> dict:
    """Train one fold; keep the top-k checkpoints by validation metric; write its out-of-fold probabilities.

    Args:
        resume: continue from ``fold{k}/last.pt`` when it exists (after an interruption); a finished fold (its
            ``fold_summary.json`` exists; ``last.pt`` is then deleted) is not retrained.
        stop_after_epochs: stop (as if interrupted) after this many epochs of this call; for tests of resuming.

    Returns:
        ``{"fold", "best_epoch", "best_metric", "per_class", "seconds", "exported"}``.
    """
    start = time.perf_counter()
    fold_dir = Path(out_dir) / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    main = dist_info.main
    done = fold_dir / "fold_summary.json"
    if resume and done.exists():
        if main:
            print(f"fold {fold}: already complete ({done}); --restart trains it again", flush=True)
        return json.loads(done.read_text())
    seed = cfg.seed * 1000 + fold
    seed_everything(seed)
    ids = np.asarray(data.image_ids)
    train_mask = folds != fold
    train_ids, val_ids = ids[train_mask].tolist(), ids[~train_mask].tolist()
    epochs = cfg.optim.epochs
    train_set = SteelDataset(data, train_ids, cfg.data, train=True, seed=seed, epochs=epochs)
    val_set = SteelDataset(data, val_ids, cfg.data, train=False)
    sampler = build_sampler(cfg.data.sampler, data.flags[train_mask], seed, dist_info.world_size, dist_info.rank)
    train_loader = _train_loader(train_set, sampler, cfg)
    val_loader = _val_loader(val_set, cfg)

    model, weights_used = build_model_with_info(cfg.model)
    model = model.to(device)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(cfg.optim, model.parameters())
    use_amp = device.type == "cuda" and cfg.optim.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    micro = len(train_loader)
    steps = micro // cfg.optim.accumulate
    if cfg.optim.steps_per_epoch is not None:
        steps = min(steps, cfg.optim.steps_per_epoch)
    steps = max(steps, 1)
    schedule = _Schedule(optimizer, cfg.optim, steps * epochs)
    losses = build_loss(cfg.loss)

    state = {"epoch": 0, "top": [], "rows": [], "bad_epochs": 0, "finished": False}
    last = fold_dir / "last.pt"
    if main:
        for stale in fold_dir.glob(".*.tmp"):  # a checkpoint being written when the last run was killed
            stale.unlink()
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        _unwrap(model).load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
        if main:
            print(f"fold {fold}: resuming after epoch {state['epoch']} from {last}", flush=True)

    ran = 0
    while state["epoch"] < epochs and not state["finished"]:
        epoch = state["epoch"]
        model.train()
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        criterion = losses.at(epoch)
        running = []
        bar = _progress(
            train_loader,
            progress and main,
            total=steps * cfg.optim.accumulate,
            desc=f"fold {fold} epoch {epoch + 1}/{epochs}",
        )
        optimizer.zero_grad(set_to_none=True)
        for i, (images, masks) in enumerate(bar):
            if i >= steps * cfg.optim.accumulate:
                break
            x = normalize(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
            masks = masks.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                output = model(x)
            loss = _loss(criterion, output, masks, cfg)
            scaler.scale(loss / cfg.optim.accumulate).backward()
            if (i + 1) % cfg.optim.accumulate == 0:
                if cfg.optim.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            running.append(loss.item())
            if progress and main:
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
        _sync_buffers(model, dist_info)
        val = _validate(model, val_loader, cfg, device, progress and main)
        schedule.epoch_end(val["value"])
        row = {
            "epoch": epoch,
            "loss": float(np.mean(running)) if running else float("nan"),
            "loss_stage": cfg.loss.stage_at(epoch),
            "lr": optimizer.param_groups[0]["lr"],
            "crop": "x".join(map(str, train_set.crop_size(epoch))),
            f"val_{val['name']}": val["value"],
            **{f"val_{val['name']}_{c}": d for c, d in zip(cfg.model.classes, val["per_class"])},
        }
        for key in ("dice_at_0.5", "iou_at_0.5", "label_accuracy"):
            if key in val:
                row[f"val_{key}"] = val[key]
        state["rows"].append(row)
        improved = _keep_top_k(state, val, epoch, model, cfg, fold, data, val_set, weights_used, fold_dir, main)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch + 1
        if cfg.optim.early_stopping is not None and state["bad_epochs"] >= cfg.optim.early_stopping:
            state["finished"] = True
            if main:
                print(f"fold {fold}: early stop after epoch {epoch + 1} ({state['bad_epochs']} epochs without gain)")
        if main:
            write_csv_atomic(pd.DataFrame(state["rows"]), fold_dir / "metrics.csv")
            (fold_dir / "metrics.json").write_text(json.dumps(state["rows"], indent=1, default=float))
            save_checkpoint(
                {
                    "state_dict": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "state": state,
                    "config": cfg.to_dict(),
                    "fold": fold,
                },
                last,
            )
            best = state["top"][0]
            print(
                f"fold {fold} epoch {epoch + 1}: loss {row['loss']:.4f} val {val['name']} {val['value']:.4f} "
                f"(best {best['value']:.4f} at epoch {best['epoch'] + 1})",
                flush=True,
            )
        ran += 1
        if stop_after_epochs is not None and ran >= stop_after_epochs and state["epoch"] < epochs:
            return {"fold": fold, "interrupted_after_epoch": state["epoch"]}

    digests = _rank_digests(model, dist_info)  # the trained weights, before rank 0 loads the exported ones
    _barrier(dist_info)
    final = fold_dir / "final.pt"
    if main and not final.exists():
        _finalize(cfg, model, fold_dir, train_set, sampler, val_loader, device, progress)
    _barrier(dist_info)
    if main and not (fold_dir / "oof_ids.txt").exists():
        _unwrap(model).load_state_dict(load_checkpoint(final)["state_dict"])
        _write_oof(model, val_loader, cfg, device, fold_dir, val_ids, val_set, progress)
    _barrier(dist_info)
    best = state["top"][0]
    final_ckpt = load_checkpoint(final) if main else {"metric": best["metric"], "epoch": best["epoch"]}
    result = {
        "fold": fold,
        "best_epoch": best["epoch"],
        "best_metric": best["value"],
        "metric_name": best["metric"]["name"],
        "per_class": best["metric"]["per_class"],
        "exported_metric": final_ckpt["metric"]["value"],
        "exported": final_ckpt.get("averaged_from", [best["epoch"]]),
        "epochs_run": state["epoch"],
        "rank_digests": digests,
        "seconds": time.perf_counter() - start,
    }
    if main:  # the fold is complete: its summary marks it done, and last.pt (3x the model) is no longer needed
        (fold_dir / "fold_summary.json").write_text(json.dumps(result, indent=2, default=float))
        last.unlink(missing_ok=True)
    _barrier(dist_info)
    return result


def _rank_digests(model: torch.nn.Module, dist_info: DistInfo) -> list[float]:
    """A float64 checksum of the trained weights on every rank (one value when not distributed): under DDP all
    ranks must end with identical weights, and the summary records the evidence."""
    total = torch.zeros(1, dtype=torch.float64)
    for value in _unwrap(model).state_dict().values():
        total += value.detach().double().sum().cpu() * 1e-3 + value.detach().double().abs().sum().cpu()
    if dist_info.world_size == 1:
        return [float(total)]
    import torch.distributed as dist

    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, total)
    return [float(g) for g in gathered]


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _loss(criterion, output, masks: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The job's loss: masks of the model's classes; labels for classifiers; both for two-headed models."""
    mask_logits, label_logits = split_outputs(output)
    if cfg.model.kind == "classifier":
        return criterion(label_logits, _label_targets(masks, cfg.model))
    loss = criterion(mask_logits, masks[:, _class_index(cfg)])
    if label_logits is not None:
        targets = _label_targets(masks, cfg.model)
        loss = loss + cfg.model.aux_weight * torch.nn.functional.binary_cross_entropy_with_logits(
            label_logits.float(), targets
        )
    return loss


def _keep_top_k(state, val, epoch, model, cfg, fold, data, val_set, weights_used, fold_dir: Path, main: bool) -> bool:
    """Insert this epoch into the top-k list (best first), writing/removing ``top{i}.pt`` and ``best.pt``.

    Returns:
        whether the epoch is the new best.
    """
    top = state["top"]
    record = {"epoch": epoch, "value": val["value"], "metric": val}
    position = sum(1 for r in top if r["value"] >= val["value"])  # ties keep the earlier epoch first
    if position >= cfg.optim.top_k:
        return False
    payload = _checkpoint_payload(model, cfg, fold, epoch, val, data, val_set, weights_used)
    top.insert(position, record)
    dropped = top[cfg.optim.top_k :]
    del top[cfg.optim.top_k :]
    if main:
        if cfg.optim.top_k > 1:
            files = {r["epoch"]: fold_dir / f"epoch{r['epoch']:03d}.pt" for r in top + dropped}
            save_checkpoint(payload, files[epoch])
            for r in dropped:
                files[r["epoch"]].unlink(missing_ok=True)
            for r in top:
                r["file"] = files[r["epoch"]].name
        if position == 0:
            save_checkpoint(payload, fold_dir / "best.pt")
    return position == 0


def _finalize(cfg, model, fold_dir: Path, train_set, sampler, val_loader, device, progress) -> None:
    """Write ``final.pt``: the greedy average of the top-k checkpoints when configured and not worse, else the best."""
    best = load_checkpoint(fold_dir / "best.pt")
    if not cfg.averaging.greedy:
        shutil.copyfile(fold_dir / "best.pt", fold_dir / "final.pt")
        return
    from .averaging import greedy_average, recalibrate_batchnorm

    net = _unwrap(model)
    candidates = []
    for path in sorted(fold_dir.glob("epoch*.pt")):
        ckpt = load_checkpoint(path)
        candidates.append((f"epoch{ckpt['epoch']}", ckpt["state_dict"], ckpt["metric"]["value"]))
    candidates.sort(key=lambda c: -c[2])

    def score(state_dict: dict) -> float:
        net.load_state_dict(state_dict)
        if cfg.averaging.recalibrate_bn:
            recalibrate_batchnorm(net, _bn_batches(train_set, sampler, cfg, device), device, cfg.averaging.bn_batches)
        return _validate(net, val_loader, cfg, device, False)["value"]

    result = greedy_average([(n, s) for n, s, _ in candidates], score, [v for _, _, v in candidates])
    net.load_state_dict(result.state_dict)
    if cfg.averaging.recalibrate_bn:
        recalibrate_batchnorm(net, _bn_batches(train_set, sampler, cfg, device), device, cfg.averaging.bn_batches)
    metric = _validate(net, val_loader, cfg, device, False)
    print(
        f"{fold_dir.name}: greedy average of {list(result.chosen)} -> val {metric['value']:.4f} "
        f"(best single {best['metric']['value']:.4f})",
        flush=True,
    )
    averaged = {
        **best,
        "state_dict": cpu_state_dict(net),
        "metric": metric,
        "averaged_from": [int(name[5:]) for name in result.chosen],
        "averaging": result.to_dict(),
    }
    save_checkpoint(averaged, fold_dir / "averaged.pt")
    chosen = averaged if metric["value"] >= best["metric"]["value"] else best
    save_checkpoint(chosen, fold_dir / "final.pt")


def _bn_batches(train_set: SteelDataset, sampler, cfg: TrainConfig, device) -> Iterator[torch.Tensor]:
    for images, _ in _train_loader(train_set, sampler, cfg):
        yield normalize(images.to(device), cfg.data.mean, cfg.data.std)


def _write_oof(model, val_loader, cfg: TrainConfig, device, fold_dir: Path, val_ids, val_set, progress) -> None:
    """Out-of-fold probabilities of the exported checkpoint: masks to a uint8 memory map, labels as float16."""
    mask_oof, labels = None, []
    offset = 0
    for probs, label_probs, _ in predict_probs(model, val_loader, cfg, device, progress):
        if probs is not None:
            if mask_oof is None:
                shape = (len(val_ids), probs.shape[1]) + tuple(val_set.size)
                mask_oof = np.lib.format.open_memmap(fold_dir / ".oof.npy.tmp", mode="w+", dtype=np.uint8, shape=shape)
            mask_oof[offset : offset + len(probs)] = to_uint8(probs).numpy()
            offset += len(probs)
        if label_probs is not None:
            labels.append(label_probs.numpy().astype(np.float16))
    if mask_oof is not None:
        mask_oof.flush()
        del mask_oof
        os.replace(fold_dir / ".oof.npy.tmp", fold_dir / "oof.npy")
    if labels:
        np.save(fold_dir / "oof_labels.npy", np.concatenate(labels))
    (fold_dir / "oof_ids.txt").write_text("\n".join(val_ids) + "\n")


def _init_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    info = DistInfo.from_env()
    if info.world_size == 1:
        return info, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def train(
    cfg: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    device: str | None = None,
    folds_to_train: Sequence[int] | None = None,
    progress: bool = True,
    resume: bool = True,
    data: TrainingSet | None = None,
) -> dict:
    """Train every fold of one job on the competition folder ``data_dir``; write the job to ``out_dir``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the folds train with DistributedDataParallel: gloo on the CPU, nccl on
    GPUs, each rank drawing its share of every epoch's sampler; rank 0 writes the files.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    dist_info, device_ = _init_distributed(device)
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_training_set(Path(data_dir))
    folds = assign_folds(data.flags, cfg.data.folds, cfg.seed)
    if dist_info.main:
        write_csv_atomic(folds_frame(data.image_ids, folds), out_dir / "folds.csv")
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    _barrier(dist_info)
    results = [
        train_fold(cfg, data, folds, k, out_dir, device_, progress, resume, dist_info)
        for k in (folds_to_train if folds_to_train is not None else cfg.data.fold_ids)
    ]
    summary = {
        "name": cfg.name,
        "kind": cfg.model.kind,
        "device": str(device_),
        "world_size": dist_info.world_size,
        "images": len(data.image_ids),
        "skipped_rows": data.labels.skipped,
        "folds": results,
        "mean_metric": float(np.mean([r["exported_metric"] for r in results])),
        "seconds": time.perf_counter() - start,
    }
    if dist_info.main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        print(
            f"trained {cfg.name}: {len(results)} folds on {len(data.image_ids)} images, val "
            f"{results[0]['metric_name']} {summary['mean_metric']:.4f}, {summary['seconds']:.0f} s on {device_}"
            + (f" x{dist_info.world_size} ranks" if dist_info.world_size > 1 else ""),
            flush=True,
        )
    return summary


def train_recipe(
    recipe: Recipe,
    data_dir: Path,
    out_dir: Path,
    device: str | None = None,
    folds_to_train: Sequence[int] | None = None,
    progress: bool = True,
    resume: bool = True,
    jobs: Sequence[str] | None = None,
    skip_bad_rows: bool = False,
) -> dict:
    """Train every job of a recipe (or the named ``jobs``) into ``out_dir/<job name>/``.

    ``skip_bad_rows`` drops train.csv rows with a malformed RLE (counted, reported, recorded as ``skipped_rows`` in
    each job's ``summary.json``) instead of refusing the file.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    selected = [j for j in recipe.jobs if jobs is None or j.name in jobs]
    if jobs is not None and len(selected) != len(set(jobs)):
        raise KeyError(f"recipe {recipe.name!r}: unknown job(s) in {list(jobs)}; jobs: {[j.name for j in recipe.jobs]}")
    for job in selected:  # names first: a typo fails in a second, not after the data is read
        check_model_config(job.model)
    data = load_training_set(Path(data_dir), on_error="skip" if skip_bad_rows else "raise")
    if data.labels.skipped:
        print(
            f"{Path(data_dir) / TRAIN_CSV}: skipped {data.labels.skipped} malformed row(s) (--skip-bad-rows)",
            file=sys.stderr,
            flush=True,
        )
    summaries = {
        job.name: train(job, data_dir, out_dir / job.name, device, folds_to_train, progress, resume, data)
        for job in selected
    }
    summary = {
        "recipe": recipe.name,
        "source": recipe.source,
        "jobs": summaries,
        "seconds": time.perf_counter() - start,
    }
    if DistInfo.from_env().main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
