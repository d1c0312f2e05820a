"""The kernel's stages in order. A valid all-empty submission is written first, then replaced by the ensemble's.

Stages: locate inputs -> read the sample submission -> write the all-empty submission -> verify the manifest's
sha256s -> load TorchScript models -> predict (fold ensemble + flip TTA, streamed) -> post-process -> write the
submission (validated, atomic) -> ``kernel_report.json``.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..constants import CLASS_IDS, IMAGE_SHAPE, SAMPLE_SUBMISSION_CSV, TEST_IMAGES
from ..csvio import read_sample_submission, write_submission
from ..images import read_grey
from ..manifest import MANIFEST_NAME, load_manifest, verify_files
from ..postprocess import PostProcess, apply_postprocess
from ..rle import encode
from .locate import find_competition, find_dataset
from .predict import Ensemble, load_models, predict_stream

__all__ = ["KernelSettings", "run_kernel"]


@dataclass(frozen=True)
class KernelSettings:
    """Everything the kernel can be told; every path can be overridden for local runs.

    Attributes:
        input_root: where Kaggle mounts inputs.
        working_dir: where ``submission.csv`` and ``kernel_report.json`` go.
        competition_dir, dataset_dir: skip the search under ``input_root`` when given.
        batch_size, num_workers: test-time DataLoader (workers decode JPEGs).
        tta: flip TTA views: ``none``, ``h``, ``v`` or ``hv``.
        device: ``cuda`` / ``cpu``; ``None`` = CUDA when available.
        fp16: float16 autocast on CUDA.
        time_limit: seconds from the kernel's start; prediction stops before it and unpredicted images stay empty.
    """

    input_root: Path = Path("/kaggle/input")
    working_dir: Path = Path("/kaggle/working")
    competition_dir: Path | None = None
    dataset_dir: Path | None = None
    batch_size: int = 8
    num_workers: int = 2
    tta: str = "h"
    device: str | None = None
    fp16: bool = True
    time_limit: float = 3300.0


@dataclass
class Report:
    settings: dict[str, Any]
    steelkit_version: str = __version__
    stages: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    submission: str = ""
    outcome: str = "started"
    counts: dict[str, Any] = field(default_factory=dict)

    def problem(self, message: str) -> None:
        print(f"steelkit kernel: PROBLEM: {message}", flush=True)
        self.problems.append(message)


def _write_report(report: Report, working_dir: Path) -> None:
    try:
        (working_dir / "kernel_report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    except OSError as err:
        print(f"steelkit kernel: cannot write kernel_report.json: {err}", flush=True)


def run_kernel(settings: KernelSettings, progress: bool = True) -> dict[str, Any]:
    """Run the kernel end to end and return its report (also written as ``kernel_report.json``)."""
    start = time.perf_counter()
    working = Path(settings.working_dir)
    report = Report(settings={k: str(v) for k, v in asdict(settings).items()})
    mark = start

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        report.stages[name] = round(now - mark, 3)
        mark = now

    competition = Path(settings.competition_dir or find_competition(settings.input_root))
    sample = read_sample_submission(competition / SAMPLE_SUBMISSION_CSV)
    submission = working / "submission.csv"
    image_ids = sample.image_ids
    test_dir = competition / TEST_IMAGES
    shape = _image_shape(test_dir, image_ids, report)
    write_submission(sample, {}, submission, shape)
    report.submission = str(submission)
    report.outcome = "all-empty written"
    stage("locate and write all-empty")
    print(f"steelkit kernel: {len(image_ids)} test images in {competition}; all-empty submission written", flush=True)

    try:
        predictions = _predict(settings, image_ids, test_dir, shape, report, start, progress, stage)
        if predictions is not None:
            write_submission(sample, predictions, submission, shape)
            report.outcome = "ensemble written"
            stage("write")
    except Exception as err:  # noqa: BLE001 - the all-empty submission already stands; report and keep it
        report.problem(f"{type(err).__name__}: {err}; keeping the previous valid submission")
        report.counts["traceback"] = traceback.format_exc()
    report.stages["total"] = round(time.perf_counter() - start, 3)
    _write_report(report, working)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.stages.items())
    print(
        f"steelkit kernel: {report.outcome} to {submission}; {len(report.models)} models; "
        f"{len(report.problems)} problems; {stages}",
        flush=True,
    )
    return asdict(report)


def _image_shape(test_dir: Path, image_ids: list[str], report: Report):
    """``(H, W)`` of the test set: read from the first readable image (256x1600 on Kaggle)."""
    for image_id in image_ids[:20]:
        try:
            return read_grey(test_dir / image_id).shape
        except ValueError as err:
            report.problem(str(err))
    return IMAGE_SHAPE


def _predict(settings, image_ids, test_dir, shape, report, start, progress, stage):
    dataset = Path(settings.dataset_dir or find_dataset(settings.input_root))
    manifest = load_manifest(dataset / MANIFEST_NAME)
    entries, problems = verify_files(manifest)
    for message in problems:
        report.problem(message)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, problems = load_models(manifest, entries, device)
    for message in problems:
        report.problem(message)
    report.models = [m.entry.name for m in models]
    stage("verify and load models")
    if not models:
        report.problem("no usable model: the all-empty submission stands")
        return None
    post = PostProcess.from_dict(manifest.postprocess)
    print(
        f"steelkit kernel: {len(models)} models on {device}, TTA {settings.tta}, thresholds {post.pixel_threshold}, "
        f"min areas {post.min_area}",
        flush=True,
    )
    ensemble = Ensemble(models, settings.tta, device, settings.fp16)
    predictions: dict = {}
    done, unreadable, stopped = 0, 0, False
    stream = predict_stream(ensemble, test_dir, image_ids, shape, settings.batch_size, settings.num_workers)
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, total=-(-len(image_ids) // settings.batch_size), desc="predict", mininterval=2.0)
    for indices, probs, errors in stream:
        for index, image_probs, error in zip(indices, probs, errors):
            image_id = image_ids[index]
            if error:
                unreadable += 1
                report.problem(f"{error}; predicted empty")
                continue
            masks = apply_postprocess(image_probs, post)
            for c, class_id in enumerate(CLASS_IDS):
                if masks[c].any():
                    predictions[(image_id, class_id)] = encode(masks[c])
        done += len(indices)
        if time.perf_counter() - start > settings.time_limit:
            report.problem(f"time limit {settings.time_limit:.0f}s reached after {done}/{len(image_ids)} images")
            stopped = True
            break
    for message in ensemble.problems:
        report.problem(message)
    stage("predict")
    report.counts.update(
        {
            "images": len(image_ids),
            "predicted": done,
            "unreadable": unreadable,
            "stopped_by_time_limit": stopped,
            "masks_per_class": {c: sum(1 for key in predictions if key[1] == c) for c in CLASS_IDS},
            "images_per_second": round(done / max(report.stages["predict"], 1e-9), 2),
        }
    )
    return predictions
