"""The kernel's stages in order, inside one time budget. A valid all-empty submission is written first; every later
stage can only replace it with a better one.

Stages (each can be switched off; each is planned, timed and logged with its effect)::

    locate -> all-empty submission -> verify sha256s -> load TorchScript models
    predict    fold ensemble of every segmenter + flip TTA (+ classifiers), streamed; the plain-ensemble
               submission is written here; probabilities are cached as uint8 at reduced size
    oof        each fold's models predict their held-out training images (a subset when time is short)
    search     per class: pixel threshold, component minimum size, label gate (max probability or classifier, or
               soft gating), whole-mask minimum area, on the exact metric, with a split-half overfit guard
    pseudo     rounds of fine-tuning on training + confident pseudo-labelled test images; kept only when the
               out-of-fold Dice does not drop
    averaging  per fold, greedy weight averaging of shipped and fine-tuned snapshots by out-of-fold Dice
    write      every stage that improves the out-of-fold Dice has already post-processed, encoded, validated and
               atomically written its submission; the last one is read back and checked against the sample

A planner (:mod:`steelkit.kernel.plan`) measures throughput on the first batches, sizes every stage for the real
test-set size and stops a stage at its deadline; ``kernel_report.json`` records the plan, each stage's estimated and
actual time and every decision, beside PNGs of the search curves, test overlays and the timeline.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .. import __version__
from ..averaging import cpu_state_dict
from ..constants import CLASS_IDS, IMAGE_SHAPE, NUM_CLASSES, SAMPLE_SUBMISSION_CSV, TEST_IMAGES, TRAIN_IMAGES
from ..csvio import read_sample_submission, read_submission, write_submission
from ..images import read_grey, resize_channels
from ..manifest import MANIFEST_NAME, load_manifest, verify_files
from ..metric import dice_masks
from ..postprocess import PostProcess, apply_postprocess
from ..rle import encode
from ..tensors import TTA_VIEWS, scaled_size, tta_views
from .locate import find_competition, find_dataset
from .plan import (
    Budget,
    ExpiringDeadline,
    Measurements,
    StageRequest,
    StageTimeout,
    Timeline,
    Variant,
    plan,
    replan,
)
from .predict import NOTE, Ensemble, LoadedModel, load_models, predict_stream, read_fitted
from .pseudo import PseudoSet, PseudoSettings, confidence_stats, finetune, select_confident

__all__ = ["GATES", "KernelSettings", "run_kernel"]

#: gating modes: none; hard (drop a class below a label threshold); soft (mask x classifier probability); auto
#: (the best on out-of-fold Dice among those the models allow)
GATES = ("auto", "none", "hard", "soft")
#: every optional stage
STAGES = ("oof", "search", "pseudo", "averaging")
#: every stage, in order (``predict`` and ``write`` always run)
ALL_STAGES = ("predict",) + STAGES + ("write",)
#: test images whose problem is printed one by one; the rest are counted (all are in the report)
IMAGE_PROBLEMS_SHOWN = 10
#: whole-mask minimum areas the kernel's search tries, as fractions of the image (0.001 = 410 px of 256x1600)
KERNEL_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.015, 0.03)


@dataclass(frozen=True)
class KernelSettings:
    """Everything the kernel can be told; every path can be overridden for local runs.

    Attributes:
        input_root: where Kaggle mounts inputs.
        working_dir: where ``submission.csv``, ``kernel_report.json`` and the PNGs go.
        competition_dir, dataset_dir: skip the search under ``input_root`` when given.
        batch_size, num_workers: test-time DataLoader (workers decode JPEGs).
        tta: flip TTA views: ``none``, ``h``, ``v`` or ``hv`` (the planner may use fewer).
        reduction, temperature: TTA reduction, ``mean`` or ``sharpen`` (mean of ``p ** temperature``).
        device: ``cuda`` / ``cpu``; ``None`` = CUDA when available.
        fp16: float16 autocast on CUDA.
        time_limit: seconds from the kernel's start (Kaggle: 3600); ``safety_margin`` of it is never planned
            (capped at 10 % of the limit).
        stages: optional stages to run (``oof``, ``search``, ``pseudo``, ``averaging``).
        gate: ``auto``, ``none``, ``hard`` or ``soft`` (see :data:`GATES`).
        oof_images: out-of-fold images wanted for the search; ``oof_scale`` their stored resolution.
        store_scale: resolution of the cached test probabilities (uint8).
        search_repeats: split-half repeats of the search's overfit guard.
        pseudo: pseudo-label selection and fine-tuning settings (``pseudo.rounds`` rounds).
        max_batch: images per forward pass (halved on out-of-memory); ``memory_cap`` simulates OOM above it.
        model_weights: ensemble weight per model name (default 1, or the manifest entry's ``weight``).
        stage_submissions: also write ``submission_<stage>.csv`` after each stage that rewrites it (for ablations).
        overlays: test images drawn with their predicted masks in ``test_overlays.png``.
        seed: seed of every random choice (OOF subset, guard splits, fine-tuning).
        simulate_timeout: ``"stage"`` or ``"stage:N"`` entries: that stage's deadline passes at its N-th check
            (default 1: after its first batch, step or evaluation), to rehearse the time limit in the middle of it.
    """

    input_root: Path = Path("/kaggle/input")
    working_dir: Path = Path("/kaggle/working")
    competition_dir: Path | None = None
    dataset_dir: Path | None = None
    batch_size: int = 8
    num_workers: int = 2
    tta: str = "h"
    reduction: str = "mean"
    temperature: float = 1.0
    device: str | None = None
    fp16: bool = True
    time_limit: float = 3600.0
    safety_margin: float = 300.0
    stages: tuple[str, ...] = STAGES
    gate: str = "auto"
    oof_images: int = 1000
    oof_scale: float = 0.25
    store_scale: float = 0.5
    search_repeats: int = 10
    pseudo: PseudoSettings = field(default_factory=PseudoSettings)
    max_batch: int = 64
    memory_cap: int | None = None
    model_weights: dict[str, float] | None = None
    stage_submissions: bool = False
    overlays: int = 4
    seed: int = 0
    simulate_timeout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; valid: {list(STAGES)}")
        if self.gate not in GATES:
            raise ValueError(f"gate {self.gate!r} is not one of {list(GATES)}")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be > 0, got {self.time_limit}")
        self.timeout_checks()  # validates

    def timeout_checks(self) -> dict[str, int]:
        """``{stage: N}`` from ``simulate_timeout``: the stage's deadline passes at its N-th check."""
        out = {}
        for item in self.simulate_timeout:
            name, _, count = item.partition(":")
            if name not in ALL_STAGES or (count and not (count.isdigit() and int(count) >= 1)):
                raise ValueError(
                    f"simulate_timeout {item!r} must be STAGE or STAGE:N (N >= 1), STAGE one of {list(ALL_STAGES)}"
                )
            out[name] = int(count or 1)
        return out

    @property
    def margin(self) -> float:
        return min(self.safety_margin, 0.1 * self.time_limit)


@dataclass
class Report:
    settings: dict[str, Any]
    steelkit_version: str = __version__
    stages: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    image_problems: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    submission: str = ""
    outcome: str = "started"
    counts: dict[str, Any] = field(default_factory=dict)
    plans: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    postprocess: dict[str, Any] = field(default_factory=dict)
    oof_dice: dict[str, Any] = field(default_factory=dict)
    pseudo: list[dict] = field(default_factory=list)
    averaging: list[dict] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        print(f"steelkit kernel: PROBLEM: {message}", flush=True)
        self.problems.append(message)

    def image_problem(self, message: str) -> None:
        """A problem with one image: all are kept in ``image_problems``, the first few printed."""
        self.image_problems.append(message)
        if len(self.image_problems) <= IMAGE_PROBLEMS_SHOWN:
            print(f"steelkit kernel: IMAGE: {message}", flush=True)
        elif len(self.image_problems) == IMAGE_PROBLEMS_SHOWN + 1:
            print("steelkit kernel: IMAGE: further image problems are counted in kernel_report.json", flush=True)


def _write_report(report: Report, working_dir: Path) -> None:
    """Write ``kernel_report.json`` atomically; on failure say so and leave no partial file."""
    tmp = working_dir / ".kernel_report.json.tmp"
    try:
        tmp.write_text(json.dumps(asdict(report), indent=2, default=str))
        tmp.replace(working_dir / "kernel_report.json")
    except OSError as err:
        print(f"steelkit kernel: cannot write {working_dir / 'kernel_report.json'}: {err}", flush=True)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _log(message: str) -> None:
    print(f"steelkit kernel: {message}", flush=True)


@dataclass
class Oof:
    """Out-of-fold predictions of the current models on held-out training images, at ``oof_scale``.

    Attributes:
        ids: image ids; ``folds``: ``(n,)`` fold of each; ``probs``: ``(n, 4, h, w)`` uint8; ``labels``: ``(n, 4)``
        classifier probabilities or ``None``; ``truth``: ``(n, 4, h, w)`` uint8; ``area_scale``: full-resolution
        pixels per stored pixel.
    """

    ids: list[str]
    folds: np.ndarray
    probs: np.ndarray
    labels: np.ndarray | None
    truth: np.ndarray
    area_scale: float


def _gated(probs: np.ndarray, labels: np.ndarray | None, gate: str) -> np.ndarray:
    """Soft gating: uint8 probabilities times the classifier's probability per class; ``(N, 4, h, w)`` with
    ``(N, 4)`` labels, or one image's ``(4, h, w)`` with ``(4,)``."""
    if gate != "soft" or labels is None:
        return probs
    return np.round(probs * labels[..., None, None]).astype(np.uint8)


def _masks(probs: np.ndarray, label: np.ndarray | None, post: PostProcess, gate: str, area_scale: float) -> np.ndarray:
    """One image's ``(4, h, w)`` uint8 probabilities to ``(4, h, w)`` bool masks: soft gate, then the post-processing
    with its label gate fed the classifier's ``(4,)`` probabilities (all 1 when there is no classifier)."""
    classifier = None if post.label_source != "classifier" else (label if label is not None else np.ones(NUM_CLASSES))
    return apply_postprocess(_gated(probs, label, gate), post, area_scale, classifier)


def oof_dice(oof: Oof, post: PostProcess, gate: str, mask: np.ndarray | None = None) -> np.ndarray:
    """``(4,)`` mean Dice per class of the out-of-fold images (or those in ``mask``) under ``post`` and ``gate``."""
    index = np.arange(len(oof.ids)) if mask is None else np.flatnonzero(mask)
    area = 1.0 / oof.area_scale
    pred = np.stack(
        [_masks(oof.probs[i], None if oof.labels is None else oof.labels[i], post, gate, area) for i in index]
    )
    return dice_masks(pred, oof.truth[index]).mean(0)


class Kernel:
    """State shared by the stages: inputs, models, the cached test probabilities and the current best settings."""

    def __init__(self, settings: KernelSettings, report: Report, progress: bool) -> None:
        self.settings = settings
        self.report = report
        self.progress = progress
        self.working = Path(settings.working_dir)
        self.submission = self.working / "submission.csv"
        self.budget = Budget(settings.time_limit, settings.margin)
        self.timeline = Timeline()
        self.measurements = Measurements()
        self.cache_dir: Path | None = None
        self.oof: Oof | None = None
        self.gate = "none"
        self.snapshots: dict[str, list[dict]] = {}
        self.failed_models: list[str] = []  # set by the test prediction: models that never gave a finite output
        self.readable: np.ndarray | None = None  # set by the test prediction: images that could be read
        self.shipped: dict[str, dict] = {}
        self.written_by = "all-empty"

    # ---------------------------------------------------------------------------------------------------- inputs
    def locate(self) -> None:
        s = self.settings
        self.working.mkdir(parents=True, exist_ok=True)
        self.competition = Path(s.competition_dir or find_competition(s.input_root))
        self.sample = read_sample_submission(self.competition / SAMPLE_SUBMISSION_CSV)
        self.image_ids = self.sample.image_ids
        self.test_dir = self.competition / TEST_IMAGES
        self.shape = self._image_shape()
        write_submission(self.sample, {}, self.submission, self.shape)
        self.report.submission = str(self.submission)
        self.report.outcome = "all-empty written"
        _log(f"{len(self.image_ids)} test images in {self.competition}; all-empty submission written")
        on_disk = sum(1 for _ in self.test_dir.glob("*.jpg")) if self.test_dir.is_dir() else 0
        self.report.counts.update({"images": len(self.image_ids), "test_images_on_disk": on_disk})
        if not self.image_ids:
            self.report.problem(f"{self.competition / SAMPLE_SUBMISSION_CSV} lists no images: nothing to predict")
        elif not on_disk:
            self.report.problem(f"{self.test_dir} holds no .jpg images: every listed image will be predicted empty")

    def _image_shape(self, sample: int = 20) -> tuple[int, int]:
        """``(H, W)`` of the test set: the most common size among the first ``sample`` readable images (ties go to
        the competition's 256x1600, then to the first seen); 256x1600 when none is readable."""
        shapes: dict[tuple[int, int], int] = {}
        for image_id in self.image_ids[:sample]:
            try:
                shape = read_grey(self.test_dir / image_id).shape
            except ValueError:  # named later, when the image is predicted
                continue
            shapes[shape] = shapes.get(shape, 0) + 1
        if not shapes:
            return IMAGE_SHAPE
        best = max(shapes.values())
        common = [shape for shape, count in shapes.items() if count == best]
        shape = IMAGE_SHAPE if IMAGE_SHAPE in common else common[0]
        if len(shapes) > 1:
            self.report.problem(f"test images of several sizes {sorted(shapes)}: predicting at {shape[1]}x{shape[0]}")
        return shape

    def load(self) -> bool:
        s = self.settings
        self.dataset = Path(s.dataset_dir or find_dataset(s.input_root))
        self.manifest = load_manifest(self.dataset / MANIFEST_NAME)
        entries, problems = verify_files(self.manifest)
        for message in problems:
            self.report.problem(message)
        self.device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        models, problems = load_models(self.manifest, entries, self.device, s.model_weights)
        for message in problems:
            self.report.problem(message)
        self.models: list[LoadedModel] = models
        self.report.models = [m.entry.name for m in models]
        self.segmenters = [m for m in models if m.kind == "segmenter"]
        self.classifiers = [m for m in models if m.kind == "classifier"]
        if not self.segmenters:
            self.report.problem("no usable model (no segmenter loaded): the all-empty submission stands")
            return False
        self.post = PostProcess.from_dict(self.manifest.postprocess)
        self.gate = "none"
        _log(
            f"{len(self.segmenters)} segmenters, {len(self.classifiers)} classifiers on {self.device}; "
            f"manifest thresholds {self.post.pixel_threshold}, min areas {self.post.min_area}"
        )
        return True

    def ensemble(self, models: list[LoadedModel], tta: str | None = None) -> Ensemble:
        s = self.settings
        return Ensemble(
            models, tta or s.tta, self.device, s.fp16, s.reduction, s.temperature, s.max_batch, s.memory_cap
        )

    # ---------------------------------------------------------------------------------------------------- predict
    def predict_test(self, tta: str, deadline, log, write: bool) -> None:
        """Stream the test set through the ensemble into a fresh uint8 cache; optionally write the submission.

        The first prediction (``write=True``) keeps whatever it finished when stopped (the rest stays empty). A
        re-prediction after the models changed (``write=False``) replaces the cache only when it completes, so a
        stage stopped half-way never leaves a cache that mixes predicted and empty images.
        """
        s = self.settings
        n = len(self.image_ids)
        if self.cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="steelkit-cache-"))
        size = scaled_size(self.shape, s.store_scale)
        name = "test_probs.npy" if not hasattr(self, "cache") else f"test_probs_{time.monotonic_ns()}.npy"
        cache = np.lib.format.open_memmap(
            self.cache_dir / name, mode="w+", dtype=np.uint8, shape=(n, NUM_CLASSES) + size
        )
        cache_labels = None if not self.classifiers else np.ones((n, NUM_CLASSES), dtype=np.float32)
        max_prob = np.zeros((n, NUM_CLASSES), dtype=np.float32)
        uncertain = np.zeros((n, NUM_CLASSES), dtype=np.float32)
        readable = np.zeros(n, dtype=bool)
        predicted = np.zeros(n, dtype=bool)
        ensemble = self.ensemble(self.models, tta)
        predictions: dict = {}
        stream = predict_stream(ensemble, self.test_dir, self.image_ids, self.shape, s.batch_size, s.num_workers)
        stream = self._bar(stream, -(-n // s.batch_size), "predict")
        done, first, unreadable, complete = 0, True, 0, False
        batch_start = time.perf_counter()
        try:
            for indices, probs, labels, errors in stream:
                for j, (index, image_probs, error) in enumerate(zip(indices, probs, errors)):
                    if error.startswith(NOTE):
                        if write:
                            self.report.image_problem(error[len(NOTE) :])
                    elif error:
                        unreadable += 1
                        if write:
                            self.report.image_problem(f"{error}; predicted empty")
                        continue
                    readable[index] = True
                    cache[index] = _resize_probs(image_probs, size)
                    if labels is not None:
                        cache_labels[index] = labels[j]
                    max_prob[index], uncertain[index] = confidence_stats(image_probs, s.pseudo.low, s.pseudo.high)
                    if write:
                        label = None if labels is None else labels[j]
                        self._encode(predictions, self.image_ids[index], image_probs, self.post, "none", label, 1.0)
                predicted[indices] = True
                done += len(indices)
                now = time.perf_counter()
                if not first:  # the first batch pays for warm-up
                    self.measurements.add(f"predict/{tta}", len(indices), now - batch_start)
                first = False
                batch_start = now
                log.units_done = done
                deadline.check()
            complete = True
        except StageTimeout:
            what = "the rest are empty" if write else "keeping the previous predictions"
            self.report.problem(f"time limit: test prediction stopped after {done}/{n} images; {what}")
            raise
        finally:
            for message in ensemble.problems:
                self.report.problem(message)
            if write and unreadable:
                self.report.problem(
                    f"{unreadable} of {n} test images could not be read: predicted empty (listed in image_problems)"
                )
            self.failed_models = ensemble.failed_models()
            cache.flush()
            if write or complete:
                old = getattr(self, "cache", None)
                if old is not None and old.filename != cache.filename:
                    Path(old.filename).unlink(missing_ok=True)  # the disk holds one test cache at a time
                self.cache, self.cache_labels, self.max_prob, self.uncertain = cache, cache_labels, max_prob, uncertain
                self.readable, self.predicted = readable, predicted
                self.report.counts.update({"images": n, "predicted": done, "unreadable": unreadable})
            if not (write or complete):
                Path(cache.filename).unlink(missing_ok=True)
            if write and done and unreadable < done and ensemble.failed_images < done:
                self._write(predictions, "ensemble")  # otherwise _drop_failed_models says why nothing was written
        if not any(k.startswith("predict/") for k in self.measurements.to_dict()):
            self.measurements.add(f"predict/{tta}", max(done, 1), time.perf_counter() - batch_start)

    def _bar(self, iterable, total: int, desc: str):
        if not self.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, mininterval=2.0)

    def _encode(self, predictions, image_id, probs, post, gate, label, area_scale) -> None:
        masks = _masks(probs, label, post, gate, area_scale)
        for c, class_id in enumerate(CLASS_IDS):
            if masks[c].any():
                predictions[(image_id, class_id)] = encode(masks[c])

    def _write(self, predictions: dict, stage: str) -> None:
        write_submission(self.sample, predictions, self.submission, self.shape)
        self.written_by = stage
        self.report.outcome = f"{stage} written"
        self.report.counts["masks_per_class"] = {c: sum(1 for k in predictions if k[1] == c) for c in CLASS_IDS}
        if self.settings.stage_submissions:
            shutil.copyfile(self.submission, self.working / f"submission_{stage}.csv")
        _log(f"submission written after {stage}: {sum(self.report.counts['masks_per_class'].values())} masks")

    def write_from_cache(self, stage: str, deadline=None) -> None:
        """Post-process the cached probabilities (upsampled to full size) with the current settings and write."""
        predictions: dict = {}
        for index in np.flatnonzero(self.readable & self.predicted):
            if deadline is not None and index % 64 == 0:
                deadline.check()
            probs = _resize_probs(np.asarray(self.cache[index]), self.shape)
            label = None if self.cache_labels is None else self.cache_labels[index]
            self._encode(predictions, self.image_ids[index], probs, self.post, self.gate, label, 1.0)
        self._write(predictions, stage)

    # ---------------------------------------------------------------------------------------------------- oof
    def fold_groups(self) -> dict[int, list[LoadedModel]]:
        """Models by fold, for the folds of the first segmenter's fold file (others cannot share its held-out set)."""
        reference = self.segmenters[0].entry.extra.get("fold_file")
        groups: dict[int, list[LoadedModel]] = {}
        for model in self.models:
            if model.entry.extra.get("fold_file") == reference and reference:
                groups.setdefault(model.entry.fold, []).append(model)
        return {k: g for k, g in sorted(groups.items()) if any(m.kind == "segmenter" for m in g)}

    @functools.cached_property
    def training_folds(self) -> tuple[list[str], np.ndarray]:
        """Every training image of the first segmenter's fold file that exists on disk, with its fold; read (and the
        disk checked) once, for the OOF stage, its planning and the pseudo-label fine-tuning."""
        import pandas as pd

        reference = self.segmenters[0].entry.extra.get("fold_file")
        if not reference:
            raise ValueError("the manifest's segmenters name no fold_file: no out-of-fold images")
        frame = pd.read_csv(self.manifest.path_of(reference))
        train_dir = self.competition / TRAIN_IMAGES
        present = frame["ImageId"].map(lambda i: (train_dir / i).is_file())
        if (~present).any():
            self.report.problem(f"{int((~present).sum())} training images of {reference} are not in {train_dir}")
        frame = frame[present]
        return frame["ImageId"].tolist(), frame["fold"].to_numpy()

    def oof_candidates(self) -> tuple[list[str], np.ndarray]:
        """Training images held out by a fold that has models, with that fold."""
        ids, folds = self.training_folds
        keep = np.isin(folds, list(self.fold_groups()))
        return [i for i, k in zip(ids, keep) if k], folds[keep]

    def predict_oof(self, units: int, deadline, log) -> None:
        """Predict ``units`` held-out training images (spread over the folds) with their fold's models."""
        from ..data import load_training_set

        s = self.settings
        ids, folds = self.oof_candidates()
        rng = np.random.default_rng(s.seed)
        if units < len(ids):
            keep = np.sort(rng.choice(len(ids), units, replace=False))
            ids, folds = [ids[i] for i in keep], folds[keep]
        self.training = load_training_set(self.competition)
        size = scaled_size(self.shape, s.oof_scale)
        n = len(ids)
        probs = np.zeros((n, NUM_CLASSES) + size, dtype=np.uint8)
        labels = None if not self.classifiers else np.ones((n, NUM_CLASSES), dtype=np.float32)
        truth = np.stack([self.training.masks(i, size) for i in ids]) if n else np.zeros((0, 4) + size, np.uint8)
        done = np.zeros(n, dtype=bool)
        self.oof = Oof(ids, folds, probs, labels, truth, (self.shape[0] * self.shape[1]) / (size[0] * size[1]))
        try:
            for k, models in self.fold_groups().items():
                self._predict_fold_oof(k, models, deadline, log, done)
        finally:
            if not done.all():
                self.report.problem(f"out-of-fold prediction stopped after {int(done.sum())}/{n} images")
                self.oof = Oof(
                    [i for i, d in zip(ids, done) if d],
                    folds[done],
                    probs[done],
                    None if labels is None else labels[done],
                    truth[done],
                    self.oof.area_scale,
                )

    def _predict_fold_oof(self, k: int, models: list[LoadedModel], deadline, log, done: np.ndarray | None) -> None:
        s = self.settings
        index = np.flatnonzero(self.oof.folds == k)
        if not len(index):
            return
        ensemble = self.ensemble(models)
        size = self.oof.probs.shape[-2:]
        ids = [self.oof.ids[i] for i in index]
        start = time.perf_counter()
        count = 0
        for local, probs, labels, _errors in predict_stream(
            ensemble, self.competition / TRAIN_IMAGES, ids, self.shape, s.batch_size, s.num_workers
        ):
            for j, (i, p) in enumerate(zip(local, probs)):
                self.oof.probs[index[i]] = _resize_probs(p, size)
                if labels is not None and self.oof.labels is not None:
                    self.oof.labels[index[i]] = labels[j]
                if done is not None:
                    done[index[i]] = True
            count += len(local)
            if log is not None:
                log.units_done = (log.units_done or 0) + len(local)
            deadline.check()
        self.measurements.add("oof", count, time.perf_counter() - start)
        for message in ensemble.problems:
            self.report.problem(message)

    # ---------------------------------------------------------------------------------------------------- search
    def search(self, log, deadline=None) -> bool:
        """Search post-processing and gating on the out-of-fold set; returns whether the settings changed. The
        deadline is checked after each gating mode's search."""
        from ..search import SearchGrid, search_full

        s = self.settings
        oof = self.oof
        if oof is None or len(oof.ids) < 8:
            raise ValueError("too few out-of-fold images to search on")
        defaults = replace(self.post, label_threshold=(0.0,) * NUM_CLASSES, label_source="max_prob")
        gates = ["none"]
        if oof.labels is not None:
            gates += ["hard", "soft"]
        if s.gate != "auto":
            gates = [g for g in gates if g == s.gate] or ["none"]
        before = oof_dice(oof, self.post, self.gate)
        results = {}
        grid = SearchGrid(area_fractions=KERNEL_AREA_FRACTIONS)
        for gate in gates:
            probs = _gated(oof.probs, oof.labels, gate)
            label_probs = oof.labels if gate == "hard" else None
            results[gate] = search_full(
                probs, oof.truth, grid, label_probs, defaults, oof.area_scale, True, s.search_repeats, s.seed
            )
            if deadline is not None:
                deadline.check()
        best_gate = max(gates, key=lambda g: (results[g].dice_after, -gates.index(g)))
        result = results[best_gate]
        after = oof_dice(oof, result.settings, best_gate)
        self.report.search = {g: r.to_dict() for g, r in results.items()}
        self.report.search["chosen_gate"] = best_gate
        self.search_result = result
        log.effect.update(
            {
                "oof_dice_before": float(before.mean()),
                "oof_dice_after": float(after.mean()),
                "per_class_before": before.round(5).tolist(),
                "per_class_after": after.round(5).tolist(),
                "gate": best_gate,
                "accepted": [r.accepted for r in result.classes],
                "reasons": [r.reason for r in result.classes],
                "oof_images": len(oof.ids),
            }
        )
        _log(
            f"search on {len(oof.ids)} OOF images: gate {best_gate}, thresholds {result.settings.pixel_threshold}, "
            f"min areas {result.settings.min_area}, min components {result.settings.min_component}, label "
            f"thresholds {result.settings.label_threshold}; OOF Dice {before.mean():.4f} -> {after.mean():.4f}"
        )
        if after.mean() + 1e-12 < before.mean():
            log.effect["kept"] = "previous settings (the search did not improve OOF Dice)"
            return False
        changed = result.settings != self.post or best_gate != self.gate
        self.post, self.gate = result.settings, best_gate
        self.report.postprocess = {**self.post.to_dict(), "gate": self.gate}
        return changed

    # ---------------------------------------------------------------------------------------------------- pseudo
    def pseudo_round(self, r: int, steps: int, deadline, log) -> dict:
        """One round: select, fine-tune every fold's segmenters, score OOF, keep or roll back."""
        s = self.settings
        per_class = any(m.entry.activation == "multilabel" for m in self.classifiers)
        chosen = select_confident(self.max_prob, self.uncertain, self.cache_labels, s.pseudo, self.readable, per_class)
        info: dict[str, Any] = {"round": r, "pseudo_images": int(len(chosen)), "steps": steps}
        if len(chosen) == 0:
            info["outcome"] = "skipped: no confident test images"
            return info
        info["pseudo_defect_images"] = int((self.max_prob[chosen] >= s.pseudo.high).any(1).sum())
        before = oof_dice(self.oof, self.post, self.gate)
        saved = {m.entry.name: cpu_state_dict(m.module) for m in self.segmenters}
        saved_oof = (self.oof.probs.copy(), None if self.oof.labels is None else self.oof.labels.copy())
        all_ids, all_folds = self.training_folds
        pseudo_items = [self._pseudo_item(i) for i in chosen]
        round_snapshots: dict[str, list[dict]] = {}
        try:
            for k, models in self.fold_groups().items():
                train_ids = [i for i, f in zip(all_ids, all_folds) if f != k]
                for model in [m for m in models if m.kind == "segmenter"]:
                    size = scaled_size(self.shape, float(model.entry.input["scale"]))
                    train_set = PseudoSet([self._train_item(i) for i in train_ids], size)
                    pseudo_set = PseudoSet(pseudo_items, size)
                    start = time.perf_counter()
                    snaps, fit = finetune(
                        model.module,
                        model.entry,
                        train_set,
                        pseudo_set,
                        s.pseudo,
                        steps,
                        self.device,
                        s.seed + r,
                        deadline,
                        s.fp16,
                    )
                    self.measurements.add("pseudo", steps, time.perf_counter() - start)
                    round_snapshots[model.entry.name] = snaps
                    info.setdefault("finetune", {})[model.entry.name] = fit
                self._predict_fold_oof(k, models, deadline, None, None)
        except BaseException:
            self._restore(saved, saved_oof)
            raise
        after = oof_dice(self.oof, self.post, self.gate)
        info.update({"oof_dice_before": float(before.mean()), "oof_dice_after": float(after.mean())})
        for name, snaps in round_snapshots.items():
            self.snapshots.setdefault(name, []).extend(snaps)
        if after.mean() + 1e-9 < before.mean():
            self._restore(saved, saved_oof)
            info["outcome"] = "rejected: out-of-fold Dice dropped"
        else:
            info["outcome"] = "kept"
        _log(
            f"pseudo round {r + 1}: {len(chosen)} images, OOF Dice {before.mean():.4f} -> {after.mean():.4f}: "
            f"{info['outcome']}"
        )
        return info

    def _restore(self, saved: dict, saved_oof) -> None:
        for model in self.segmenters:
            model.module.load_state_dict(saved[model.entry.name])
        self.oof.probs[:] = saved_oof[0]
        if saved_oof[1] is not None:
            self.oof.labels[:] = saved_oof[1]

    def _pseudo_item(self, index: int):
        path = self.test_dir / self.image_ids[index]
        area = (self.cache.shape[-2] * self.cache.shape[-1]) / (self.shape[0] * self.shape[1])

        def masks() -> np.ndarray:
            label = None if self.cache_labels is None else self.cache_labels[index]
            return _masks(np.asarray(self.cache[index]), label, self.post, self.gate, area).astype(np.uint8)

        return (lambda: read_fitted(path, self.shape)[0]), masks

    def _train_item(self, image_id: str):
        path = self.competition / TRAIN_IMAGES / image_id
        return (lambda: read_grey(path, self.shape)), (lambda: self.training.masks(image_id))

    # ---------------------------------------------------------------------------------------------------- averaging
    def average(self, deadline, log) -> bool:
        """Per fold and segmenter: greedy average of its current, shipped, fine-tuned and same-architecture weights."""
        from ..averaging import greedy_average

        changed = False
        groups = self.fold_groups()
        for k, models in groups.items():
            mask = self.oof.folds == k
            if not mask.any():
                continue
            for model in [m for m in models if m.kind == "segmenter"]:
                deadline.check()
                name = model.entry.name
                candidates = [("current", cpu_state_dict(model.module))]
                shipped = self.shipped.get(name)
                if shipped is not None and any(not torch.equal(shipped[k], candidates[0][1][k]) for k in shipped):
                    candidates.append(("shipped", shipped))  # only when a kept pseudo round changed the weights
                candidates += [(f"snapshot{i}", sd) for i, sd in enumerate(self.snapshots.get(name, []))]
                candidates += [
                    (other.entry.name, cpu_state_dict(other.module))
                    for other in models
                    if other is not model and _same_architecture(other, model)
                ]
                if len(candidates) < 2:
                    continue
                saved = candidates[0][1]
                saved_probs = self.oof.probs[mask].copy()

                def score(state_dict, model=model, k=k, models=models, mask=mask):
                    deadline.check()
                    model.module.load_state_dict(state_dict)
                    self._predict_fold_oof(k, models, deadline, None, None)
                    return float(oof_dice(self.oof, self.post, self.gate, mask).mean())

                try:
                    result = greedy_average(candidates, score)
                except StageTimeout:
                    model.module.load_state_dict(saved)
                    self.oof.probs[mask] = saved_probs
                    raise
                current_score = result.individual["current"]
                entry = {
                    "model": name,
                    "fold": k,
                    "chosen": list(result.chosen),
                    "score": result.score,
                    "current": current_score,
                    "candidates": [c for c, _ in candidates],
                }
                if result.chosen != ("current",) and result.score > current_score + 1e-9:
                    model.module.load_state_dict(result.state_dict)
                    self._predict_fold_oof(k, models, deadline, None, None)
                    entry["outcome"] = "averaged"
                    changed = True
                else:
                    model.module.load_state_dict(saved)
                    self.oof.probs[mask] = saved_probs
                    entry["outcome"] = "kept current weights"
                self.report.averaging.append(entry)
                _log(
                    f"averaging {name}: {entry['outcome']} ({list(result.chosen)}, "
                    f"OOF {current_score:.4f} -> {result.score:.4f})"
                )
        log.effect["averaging"] = self.report.averaging
        return changed


def _same_architecture(a: LoadedModel, b: LoadedModel) -> bool:
    keys = ("architecture", "encoder", "activation", "classes")
    return (
        all(getattr(a.entry, k) == getattr(b.entry, k) for k in keys)
        and a.entry.input == b.entry.input
        and (a.entry.aux_head == b.entry.aux_head)
    )


def _resize_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` uint8 probabilities to ``(C, h, w)``: area when shrinking, bilinear when growing."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    shrink = size[0] * size[1] < probs.shape[-2] * probs.shape[-1]
    return resize_channels(probs, size, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _requests(kernel: Kernel, settings: KernelSettings) -> list[StageRequest]:
    """What each stage would like to do, with first estimates (replaced by measurements as stages run)."""
    n = len(kernel.image_ids)
    views = {name: len(tta_views(name)) for name in TTA_VIEWS}
    per_view = kernel.measurements.seconds_per_unit(f"predict/{settings.tta}")
    per_view = (per_view or 0.05) / views[settings.tta]
    ladder = [t for t in ("hv", "h", "none") if views[t] <= views[settings.tta] and t != settings.tta]
    predict_spu = per_view * views[settings.tta]
    groups = kernel.fold_groups() if kernel.segmenters else {}
    n_models = max(1, len(kernel.models))
    fold_share = max(1, len(groups))
    oof_spu = predict_spu / fold_share
    try:
        oof_total = len(kernel.oof_candidates()[0]) if "oof" in settings.stages and groups else 0
    except (ValueError, OSError):  # no fold file: nothing to hold out
        oof_total = 0
    oof_units = min(settings.oof_images, oof_total)
    n_seg = max(1, len(kernel.segmenters))
    step_s = kernel.measurements.seconds_per_unit("pseudo", predict_spu * settings.pseudo.batch_size * 1.5 / n_models)
    rounds = settings.pseudo.rounds
    # a pseudo round also re-predicts the OOF set and, when kept, the test set
    pseudo_fixed = rounds * (oof_units * oof_spu + n * predict_spu)
    pseudo_on = "pseudo" in settings.stages
    candidates = 1 + (1 + settings.pseudo.snapshots * rounds if pseudo_on else 0)
    avg_candidates = n_seg * max(1, 2 * candidates - 1)  # individual scores, then one try per further candidate
    write_spu = 0.004
    requests = [
        StageRequest(
            "predict",
            n,
            predict_spu,
            min_units=0,
            mandatory=True,
            label=settings.tta,
            shrink_steps=tuple(Variant(t, per_view * views[t]) for t in ladder),
            unit_name="images",
        ),
        StageRequest("oof", oof_units, oof_spu, min_units=min(oof_units, 48), value=3.0, unit_name="images"),
        StageRequest("search", 1, 2.0 + 0.01 * oof_units, value=3.0, requires=("oof",)),
        StageRequest(
            "pseudo",
            rounds * settings.pseudo.steps * n_seg,
            step_s,
            min_units=min(rounds * n_seg * 5, rounds * settings.pseudo.steps * n_seg),
            fixed_seconds=pseudo_fixed,
            value=1.0,
            requires=("oof",),
            unit_name="steps",
        ),
        StageRequest(
            "averaging",
            avg_candidates,
            oof_units * oof_spu / fold_share + 0.1,
            min_units=min(avg_candidates, 2),
            fixed_seconds=n * predict_spu,
            value=0.5,
            requires=("oof",),
            unit_name="evaluations",
        ),
        StageRequest("write", n, write_spu, mandatory=True, unit_name="images"),
    ]
    wanted = set(settings.stages)
    return [r for r in requests if r.mandatory or (r.name in wanted and r.units > 0)]


def run_kernel(settings: KernelSettings, progress: bool = True) -> dict[str, Any]:
    """Run the kernel end to end and return its report (also written as ``kernel_report.json``)."""
    report = Report(settings={k: str(v) for k, v in asdict(settings).items()})
    report.counts["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # set by kernels/inference.py
    kernel = Kernel(settings, report, progress)
    start = time.perf_counter()
    try:
        kernel.locate()
    except Exception as err:  # no sample submission, or nowhere to write: nothing can be submitted; say why, loudly
        report.problem(f"{type(err).__name__}: {err}")
        report.outcome = "failed: no submission written"
        _write_report(report, kernel.working)
        raise
    report.stages["locate and write all-empty"] = round(time.perf_counter() - start, 3)
    try:
        _run(kernel)
    except Exception as err:  # noqa: BLE001 - the best submission so far stands; report and keep it
        report.problem(f"{type(err).__name__}: {err}; keeping the submission written after {kernel.written_by}")
        report.counts["traceback"] = traceback.format_exc()
    finally:
        if kernel.cache_dir is not None:
            shutil.rmtree(kernel.cache_dir, ignore_errors=True)
    report.timeline = kernel.timeline.to_dict()
    report.stages["total"] = round(time.perf_counter() - start, 3)
    _figures(kernel)
    _write_report(report, kernel.working)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.stages.items())
    _log(
        f"{report.outcome} to {kernel.submission}; {len(report.models)} models; {len(report.problems)} problems; "
        f"{stages}"
    )
    return asdict(report)


def _run(kernel: Kernel) -> None:
    settings, report, budget, timeline = kernel.settings, kernel.report, kernel.budget, kernel.timeline
    if not kernel.image_ids:
        return
    mark = time.perf_counter()
    loaded = kernel.load()
    report.stages["verify and load models"] = round(time.perf_counter() - mark, 3)
    if not loaded:
        return
    simulated = settings.timeout_checks()
    requests = _requests(kernel, settings)
    current = plan(requests, budget.remaining())
    report.plans.append({"when": "start", **current.to_dict()})
    for line in current.summary_lines():
        _log(f"plan: {line}")
    done: set[str] = set()
    oof_ok = False
    for name in [r.name for r in requests]:
        if done:  # fresh estimates from what has been measured so far, for the time that is left
            current = replan(_requests(kernel, settings), kernel.measurements, budget, done=done)
            report.plans.append({"when": f"before {name}", **current.to_dict()})
            if name in current and current[name].action != "run":
                _log(f"plan: {current[name].summary_line()}")
        decision = current[name] if name in current else None
        if decision is None or decision.action == "dropped":
            if decision is not None:
                timeline.dropped(decision)
            done.add(name)
            continue
        if name in ("search", "pseudo", "averaging") and not oof_ok:
            timeline.dropped(replace(decision, action="dropped", reason="no out-of-fold predictions"))
            done.add(name)
            continue
        remaining = budget.remaining()
        allowance = current.allowance_s(name, remaining)
        if not decision.mandatory:  # small estimates are noisy: allow 1.5x + 10 s while the budget has room
            allowance = max(
                allowance, min(current.allowance_s(name, remaining, math.inf), 1.5 * decision.estimated_s + 10)
            )
        deadline = budget.deadline_for(allowance, name)
        if name in simulated:
            deadline = ExpiringDeadline(deadline, simulated[name])
        mark = time.perf_counter()
        saved_post = (kernel.post, kernel.gate)
        with timeline.stage(decision) as log:
            if name == "predict":
                kernel.predict_test(decision.variant or settings.tta, deadline, log, write=True)
            elif name == "oof":
                kernel.predict_oof(decision.units, deadline, log)
            elif name == "search":
                if kernel.search(log, deadline):
                    kernel.write_from_cache("search", deadline)
                report.oof_dice["search"] = log.effect["per_class_after"]
            elif name == "pseudo":
                _pseudo(kernel, decision, deadline, log)
            elif name == "averaging":
                if kernel.average(deadline, log):
                    kernel.predict_test(
                        settings.tta if decision.variant == "" else decision.variant, deadline, log, write=False
                    )
                    kernel.write_from_cache("averaging", deadline)
                report.oof_dice["averaging"] = oof_dice(kernel.oof, kernel.post, kernel.gate).round(5).tolist()
            elif name == "write":  # every improving stage wrote at once; check the file on disk once more
                frame = read_submission(kernel.submission, kernel.sample, kernel.shape)
                log.effect.update({"written_by": kernel.written_by, "rows": len(frame)})
                log.effect["masks"] = int((frame["EncodedPixels"] != "").sum())
        if name == "oof":  # a stopped stage keeps the images it finished
            oof_ok = log.ok and kernel.oof is not None and len(kernel.oof.ids) >= 8
            if oof_ok:
                log.effect["oof_images"] = len(kernel.oof.ids)
                log.effect["oof_dice"] = oof_dice(kernel.oof, kernel.post, kernel.gate).round(5).tolist()
                report.oof_dice["ensemble"] = log.effect["oof_dice"]
        if name == "search" and log.outcome != "done":  # keep only settings the submission was written with
            kernel.post, kernel.gate = saved_post
            report.postprocess = {**kernel.post.to_dict(), "gate": kernel.gate}
        if log.outcome != "done":
            report.problem(f"stage {name} {log.outcome}; keeping the submission written after {kernel.written_by}")
        report.stages[name] = round(time.perf_counter() - mark, 3)
        done.add(name)
        if name == "predict" and not _drop_failed_models(kernel):
            break
    report.counts["written_by"] = kernel.written_by
    report.counts["pseudo_rounds"] = report.pseudo


def _drop_failed_models(kernel: Kernel) -> bool:
    """After the test prediction: leave out of later stages every model that never gave finite output, and stop
    (``False``) when no segmenter is left or no test image got a prediction."""
    failed = set(kernel.failed_models)
    if failed:
        kernel.report.problem(f"dropped from later stages (never a finite output): {sorted(failed)}")
        kernel.models = [m for m in kernel.models if m.entry.name not in failed]
        kernel.segmenters = [m for m in kernel.segmenters if m.entry.name not in failed]
        kernel.classifiers = [m for m in kernel.classifiers if m.entry.name not in failed]
        kernel.report.models = [m.entry.name for m in kernel.models]
    if not kernel.segmenters:
        kernel.report.problem("every segmenter failed: the all-empty submission stands")
        kernel.report.outcome = "all-empty written (every model failed)"
        return False
    if kernel.readable is None or not kernel.readable.any():
        kernel.report.problem("no test image could be read: the all-empty submission stands")
        return False
    return True


def _pseudo(kernel: Kernel, decision, deadline, log) -> None:
    settings = kernel.settings
    rounds = settings.pseudo.rounds
    n_seg = max(1, len(kernel.segmenters))
    steps = max(1, decision.units // max(1, rounds * n_seg))
    kernel.shipped = {m.entry.name: cpu_state_dict(m.module) for m in kernel.segmenters}
    kept_any = False
    for r in range(rounds):
        info = kernel.pseudo_round(r, steps, deadline, log)
        kernel.report.pseudo.append(info)
        if info.get("outcome") == "kept":
            kept_any = True
            kernel.predict_test(settings.tta, deadline, log, write=False)
            kernel.write_from_cache(f"pseudo{r + 1}", deadline)
    log.effect["rounds"] = kernel.report.pseudo
    log.effect["kept"] = kept_any
    kernel.report.oof_dice["pseudo"] = oof_dice(kernel.oof, kernel.post, kernel.gate).round(5).tolist()


def _figures(kernel: Kernel) -> None:
    """PNGs beside the report: search curves, test overlays, stage timeline (never fatal)."""
    from . import report as figures

    working = kernel.working
    try:
        figures.plot_stage_timeline(kernel.timeline.logs, kernel.budget.limit_s, working / "kernel_timeline.png")
        kernel.report.figures.append("kernel_timeline.png")
    except Exception as err:  # noqa: BLE001 - figures are a bonus
        kernel.report.problem(f"timeline figure failed: {type(err).__name__}: {err}")
    result = getattr(kernel, "search_result", None)
    if result is not None:
        try:
            curves = {f"class {c}": _curves(r, result) for c, r in zip(CLASS_IDS, result.classes)}
            figures.plot_curves(curves, working / "search_curves.png")
            kernel.report.figures.append("search_curves.png")
        except Exception as err:  # noqa: BLE001
            kernel.report.problem(f"search figure failed: {type(err).__name__}: {err}")
    try:
        _overlays(kernel, working / "test_overlays.png")
    except Exception as err:  # noqa: BLE001
        kernel.report.problem(f"overlay figure failed: {type(err).__name__}: {err}")


def _curves(r, result):
    from .report import ClassCurves

    axes = r.axes
    pick = (r.threshold, r.min_component, r.label_threshold, r.min_area)
    keys = ("threshold", "min_component", "label_threshold", "min_area")
    chosen = tuple(int(np.argmin(np.abs(np.asarray(axes[k]) - v))) for k, v in zip(keys, pick))
    return ClassCurves(
        table=r.table,
        thresholds=axes["threshold"],
        min_components=axes["min_component"],
        label_thresholds=axes["label_threshold"],
        min_areas=axes["min_area"],
        chosen=chosen,
        default=None,
        empty_dice=r.empty,
        area_scale=result.area_scale,
    )


def _overlays(kernel: Kernel, path: Path) -> None:
    from ..csvio import read_submission
    from ..rle import decode
    from .report import overlay_masks, write_overlays

    if not kernel.settings.overlays or not kernel.submission.exists():
        return
    frame = read_submission(kernel.submission, kernel.sample, kernel.shape)
    frame = frame[frame["EncodedPixels"] != ""]
    tiles = []
    for image_id in list(dict.fromkeys(frame["ImageId"]))[: kernel.settings.overlays]:
        masks = np.zeros((NUM_CLASSES,) + tuple(kernel.shape), dtype=bool)
        for class_id, rle in frame.loc[frame["ImageId"] == image_id, ["ClassId", "EncodedPixels"]].itertuples(False):
            masks[int(class_id) - 1] = decode(rle, kernel.shape).astype(bool)
        image = read_fitted(kernel.test_dir / image_id, kernel.shape)[0]
        tiles.append(overlay_masks(image, masks, None, f"{image_id} ({kernel.written_by})"))
    if write_overlays(tiles, path) is not None:
        kernel.report.figures.append(path.name)
