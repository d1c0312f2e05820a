"""Throughput of the kernel's predict stage on a GPU against the bare forward, and what the planner makes of it.

Run on any CUDA machine (a Kaggle GPU kernel, a rented GPU) from the repository root::

    python bench/gpu.py                      # efficientnet-b3 Unet, 256x1600, 512 JPEGs, 5 folds, TTA hv, fp32 + fp16
    python bench/gpu.py --device cpu --images 4 --height 64 --width 320 --batch-size 2 --folds 2 --tta h \\
        --warmup 1 --repeats 2 --num-workers 1 --out /tmp/gpu-sanity --name cpu   # a CPU sanity run (CPU figures)

What it does, in a temporary folder (deleted at the end):

1. builds ``Unet("efficientnet-b3", encoder_weights=None, classes=4)`` through steelkit's own registry
   (:func:`steelkit.models.build_model`), sets its head's bias to ``--head-bias`` (random weights otherwise put about
   half of the pixels above 0.5 in noisy patterns; a trained model predicts sparse masks), and scripts it with
   :func:`steelkit.export.script_model` (``torch.jit.script``, saved, reloaded and checked against eager);
2. writes two dataset folders the way ``steelkit export`` does: ``weights_manifest.json`` (:func:`save_manifest`,
   every file pinned by sha256) with one model, and with ``--folds`` fold entries sharing the one TorchScript file
   (each entry is loaded as its own module, as the kernel loads real folds);
3. writes ``--images`` synthetic test JPEGs at ``--height`` x ``--width`` with :func:`steelkit.synth.synthesize` in the
   competition layout, and a fold file of 1,000 training images (links to the test JPEGs) so the planner sees the
   out-of-fold stage the kernel would plan on the real training set;
4. per precision (fp32; fp16 autocast on CUDA only):
   (a) the bare forward of the loaded TorchScript model on one pre-made normalised batch already on the device
   (warm-up passes, then the median of ``--repeats`` synchronised passes);
   (b) the kernel's real predict stage, ``Kernel.predict_test`` (sha256 check and TorchScript load first, then
   ``Ensemble`` + ``predict_stream`` over the JPEG folder with DataLoader workers, the TTA views, and every uint8
   output consumed as the kernel consumes it: resized into the probability cache, confidence statistics,
   post-processed, RLE-encoded, ``submission.csv`` written), for one model and for the fold ensemble; images/s is
   the kernel's own measurement (its first batch, which pays for warm-up, is left out);
5. feeds the ensemble's measured seconds per image into the kernel's own stage requests and planner
   (``pipeline._requests`` + :func:`steelkit.kernel.plan.plan`) for ``--test-images`` test images (5,506 on Kaggle)
   in the ``--time-limit`` budget less the kernel's safety margin and the measured start-up;
6. writes ``<out>/<name>.md`` and ``<out>/<name>.json`` with :func:`common.write_results` (machine and GPU name
   included) and prints a one-line summary.

"fed" is measured predict images/s divided by the ideal: bare forward images/s / (models x TTA views), i.e. how much
of the GPU's forward throughput the whole stage (JPEG decoding, normalisation, flips, resizing, the host copy and
the CPU-side post-processing) keeps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

from steelkit.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig  # noqa: E402
from steelkit.constants import SAMPLE_SUBMISSION_CSV, TEST_IMAGES, TRAIN_IMAGES  # noqa: E402
from steelkit.csvio import read_sample_submission  # noqa: E402
from steelkit.export import script_model  # noqa: E402
from steelkit.kernel.pipeline import Kernel, KernelSettings, Report, _requests  # noqa: E402
from steelkit.kernel.plan import Deadline, StageLog, plan  # noqa: E402
from steelkit.kernel.predict import TestImages  # noqa: E402
from steelkit.manifest import MANIFEST_NAME, Manifest, ModelEntry, save_manifest, sha256_file  # noqa: E402
from steelkit.models import build_model  # noqa: E402
from steelkit.synth import synthesize  # noqa: E402
from steelkit.tensors import TTA_VIEWS, normalize, resize_to, scaled_size, tta_views  # noqa: E402

#: images in the competition's hidden test set (public + private), what the kernel predicts on Kaggle
KAGGLE_TEST_IMAGES = 5506
#: TTA views the issue asks the planner about; no TTA setting of the kernel has exactly 3 (see ``TTA_VIEWS``)
ISSUE_VIEWS = 3
#: file name of the one TorchScript file every fold entry points at
MODEL_FILE = "bench-unet-fold.pt"
#: fold file beside the manifests
FOLD_FILE = "folds.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a sanity run: CPU figures)")
    p.add_argument("--images", type=int, default=512, help="synthetic test JPEGs streamed through the predict stage")
    p.add_argument("--batch-size", type=int, default=16, help="DataLoader batch (the kernel's --batch-size)")
    p.add_argument("--max-batch", type=int, default=64, help="images per forward pass (the kernel's --max-batch)")
    p.add_argument("--num-workers", type=int, default=2, help="JPEG-decoding DataLoader workers (kernel default 2)")
    p.add_argument("--folds", type=int, default=5, help="fold models in the ensemble")
    p.add_argument("--tta", default="hv", choices=sorted(TTA_VIEWS), help="flip TTA views (hv = 4 views)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    p.add_argument("--height", type=int, default=256, help="image height (multiple of 32)")
    p.add_argument("--width", type=int, default=1600, help="image width (multiple of 32)")
    p.add_argument("--arch", default="unet", help="segmenter architecture (steelkit.models.SEGMENTERS)")
    p.add_argument("--encoder", default="efficientnet-b3")
    p.add_argument("--head-bias", type=float, default=-4.0, help="bias of the random model's mask head")
    p.add_argument("--warmup", type=int, default=3, help="bare forward passes before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed bare forward passes (median)")
    p.add_argument("--test-images", type=int, default=KAGGLE_TEST_IMAGES, help="test-set size the planner plans")
    p.add_argument("--time-limit", type=float, default=3600.0, help="the kernel's time limit the planner plans in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--name", default="gpu", help="results file stem")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the temporary folder goes (default: system)")
    args = p.parse_args(argv)
    if args.height % 32 or args.width % 32:
        p.error(f"--height and --width must be multiples of 32, got {args.height}x{args.width}")
    if min(args.images, args.batch_size, args.folds, args.repeats, args.test_images) < 1 or args.num_workers < 0:
        p.error("--images, --batch-size, --folds, --repeats and --test-images must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or pass --device cpu for a CPU sanity run")
    return args


# ---------------------------------------------------------------------------------------------- inputs
def write_competition(root: Path, n: int, shape: tuple[int, int], seed: int, train_images: int) -> Path:
    """A competition folder: ``n`` synthetic test JPEGs + sample submission, and ``train_images`` training images
    (links to the test JPEGs) for the fold file the planner's out-of-fold estimate reads."""
    competition = root / "competition"
    synthesize(competition, n_train=0, n_test=n, seed=seed, height=shape[0], width=shape[1], progress=False)
    tests = sorted((competition / TEST_IMAGES).glob("*.jpg"))
    for i in range(train_images):
        (competition / TRAIN_IMAGES / f"oof{i:05d}.jpg").symlink_to(tests[i % len(tests)])
    return competition


def export_model(path: Path, cfg: ModelConfig, head_bias: float) -> None:
    """Build ``cfg`` with random weights, set its mask head's bias, script it to ``path`` (checked against eager)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.segmentation_head[0].bias.fill_(head_bias)
    script_model(model, path)


def write_dataset(
    folder: Path, model_file: Path, fold_csv: Path, cfg: ModelConfig, folds: int, models: int, shape: tuple[int, int]
) -> Path:
    """A dataset folder like ``steelkit export`` writes: ``models`` fold entries (folds 0..models-1 of ``folds``)
    pinned to one TorchScript file, the fold file, and ``weights_manifest.json``."""
    folder.mkdir(parents=True)
    target = folder / MODEL_FILE
    try:
        os.link(model_file, target)
    except OSError:
        shutil.copyfile(model_file, target)
    shutil.copyfile(fold_csv, folder / FOLD_FILE)
    digest, size = sha256_file(target), target.stat().st_size
    entries = [
        ModelEntry(
            name=f"bench-{cfg.arch}-{cfg.encoder}-fold{k}",
            file=MODEL_FILE,
            sha256=digest,
            size=size,
            kind="segmenter",
            format="torchscript",
            architecture=cfg.arch,
            encoder=cfg.encoder,
            fold=k,
            folds=folds,
            classes=list(cfg.classes),
            activation=cfg.head,
            input={"channels": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1.0},
            train_size=list(shape),
            val_metric={"name": "dice", "value": 0.0, "note": "random weights: a throughput benchmark"},
            thresholds={},
            extra={"job": "bench", "fold_file": FOLD_FILE, "aux_head": False, "config": dataclasses.asdict(cfg)},
        )
        for k in range(models)
    ]
    postprocess = {"pixel_threshold": [0.5] * 4, "min_area": [0] * 4, "min_component": [0] * 4, "source": "bench"}
    files = {FOLD_FILE: {"sha256": sha256_file(folder / FOLD_FILE), "size": (folder / FOLD_FILE).stat().st_size}}
    manifest = Manifest(models=tuple(entries), postprocess=postprocess, files=files, image_size=shape, folder=folder)
    return save_manifest(manifest, folder / MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare_forward(kernel: Kernel, batch: int, fp16: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """Images/s of the kernel's first loaded model alone: one ``(batch, 3, h, w)`` input normalised as the kernel
    normalises it, already on the device; the median of ``repeats`` synchronised passes after ``warmup`` passes, under
    ``torch.no_grad`` and (``fp16``) float16 autocast, as ``Ensemble`` runs it. The batch is halved on a CUDA
    out-of-memory error, as the kernel halves its own."""
    model, device = kernel.models[0], kernel.device
    inputs = model.entry.input
    size = scaled_size(kernel.shape, float(inputs["scale"]))
    halved = []
    while True:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 1) + tuple(kernel.shape), dtype=torch.uint8, generator=generator)
        _reset_peak(device)
        times = []
        try:
            x = resize_to(normalize(images.to(device), inputs["mean"], inputs["std"]), size, "area")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                for _ in range(warmup):
                    out = model.module(x)
                _sync(device)
                for _ in range(repeats):
                    start = time.perf_counter()
                    out = model.module(x)
                    _sync(device)
                    times.append(time.perf_counter() - start)
            break
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
            x = out = None
            _free(device)
            halved.append(batch)
            batch //= 2
    out = out[0] if isinstance(out, (tuple, list)) else out
    median = statistics.median(times)
    return {
        "images_per_s": batch / median,
        "batch": batch,
        "out_of_memory_at": halved,
        "input_shape": list(x.shape),
        "median_s": median,
        "times_s": times,
        "output_dtype": str(out.dtype).replace("torch.", ""),
        "peak_gpu_mib": _peak_mib(device),
    }


def loader_only(folder: Path, image_ids: list[str], shape: tuple[int, int], args, device: torch.device) -> dict:
    """Images/s of the kernel's JPEG DataLoader alone (``TestImages``, same batch and workers), copied to the device:
    the ceiling the CPU side puts on the predict stage before any model runs."""
    loader = DataLoader(
        TestImages(folder, image_ids, shape),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    start, count = time.perf_counter(), 0
    for _, images, _ in loader:
        images.to(device, non_blocking=True)
        count += len(images)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": count / seconds, "images": count, "seconds": seconds}


def kernel_predict(settings: KernelSettings) -> tuple[Kernel, dict[str, Any]]:
    """Run the kernel's predict stage (``Kernel.predict_test``) as the kernel does after locating and loading.

    Returns:
        the kernel (its ``measurements`` hold ``predict/<tta>``) and the figures: steady-state images/s (the kernel's
        own measurement, first batch excluded), wall seconds of the whole stage, start-up seconds (locate, all-empty
        submission, sha256 checks, TorchScript loads), peak GPU memory, problems.
    """
    kernel = Kernel(settings, Report(settings={}), progress=False)
    start = time.perf_counter()
    kernel.locate()
    if not kernel.load():
        raise RuntimeError(f"the kernel loaded no segmenter: {kernel.report.problems}")
    setup_s = time.perf_counter() - start
    _reset_peak(kernel.device)
    log = StageLog("predict")
    start = time.perf_counter()
    try:
        kernel.predict_test(settings.tta, Deadline.unlimited(stage="predict"), log, write=True)
    finally:
        if kernel.cache_dir is not None:  # run_kernel removes it; here we are the kernel
            shutil.rmtree(kernel.cache_dir, ignore_errors=True)
    wall_s = time.perf_counter() - start
    measured = kernel.measurements.get(f"predict/{settings.tta}")
    return kernel, {
        "images_per_s": measured.rate,
        "seconds_per_image": measured.seconds_per_unit,
        "measured_images": measured.units,
        "images": log.units_done,
        "wall_s": wall_s,
        "wall_images_per_s": (log.units_done or 0) / wall_s,
        "setup_s": setup_s,
        "models": len(kernel.models),
        "peak_gpu_mib": _peak_mib(kernel.device),
        "problems": list(kernel.report.problems),
    }


def planner(kernel: Kernel, n_test: int, setup_s: float) -> dict[str, Any]:
    """The kernel's plan for ``n_test`` test images with the throughput ``kernel`` measured.

    The kernel builds its stage requests from itself (``_requests`` reads the test-set size from ``image_ids``), so a
    shallow copy with ``n_test`` stand-in ids is planned; the budget is the time limit less the safety margin and
    ``setup_s`` (what the kernel spends before its first plan).
    """
    settings = kernel.settings
    view = copy.copy(kernel)
    view.image_ids = [f"planned{i:05d}.jpg" for i in range(n_test)]
    requests = _requests(view, settings)
    available = settings.time_limit - settings.margin - setup_s
    current = plan(requests, available)
    predict_request = next(r for r in requests if r.name == "predict")
    views = len(tta_views(settings.tta))
    per_view = predict_request.seconds_per_unit / views
    decision = current["predict"]
    return {
        "test_images": n_test,
        "models": len(kernel.models),
        "tta": settings.tta,
        "views": views,
        "seconds_per_image": predict_request.seconds_per_unit,
        "predict_full_s": predict_request.cost(n_test, predict_request.seconds_per_unit),
        "predict_estimate_s": decision.estimated_s,
        "predict_decision": decision.summary_line(),
        "predict_3_views_s": n_test * per_view * ISSUE_VIEWS,
        "time_limit_s": settings.time_limit,
        "margin_s": settings.margin,
        "setup_s": setup_s,
        "available_s": available,
        "fits": decision.action == "run" and not current.over_budget,
        "summary": current.summary_lines(),
        "plan": current.to_dict(),
    }


# ---------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = (args.height, args.width)
    precisions = [p for p in args.precisions if cuda or p == "fp32"]
    notes = []
    if not cuda:
        notes.append("CPU FIGURES: this run had no GPU; they say nothing about GPU throughput.")
        if "fp16" in args.precisions:
            notes.append("fp16 skipped: the kernel autocasts to float16 on CUDA only (Ensemble turns fp16 off on CPU).")
    counts = {name: len(views) for name, views in TTA_VIEWS.items()}
    if ISSUE_VIEWS not in counts.values():
        notes.append(
            f"No kernel TTA setting has {ISSUE_VIEWS} views ({counts}): measured "
            f"with --tta {args.tta} ({len(tta_views(args.tta))} views); the {ISSUE_VIEWS}-view figure is the planner's "
            "seconds per view x 3."
        )
    cfg = ModelConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None)
    oof_images = KernelSettings().oof_images
    data: dict[str, Any] = {"device": str(device), "cuda": cuda, "precisions": precisions, "args": vars(args)}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        data["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
        data["gpu"]["capability"] = f"{props.major}.{props.minor}"
    with tempfile.TemporaryDirectory(prefix="steelkit-gpubench-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        competition = write_competition(root, args.images, shape, args.seed, oof_images)
        data["synth_s"] = time.perf_counter() - start
        fold_csv = root / FOLD_FILE
        ids = [f"oof{i:05d}.jpg" for i in range(oof_images)]
        fold_csv.write_text("ImageId,fold\n" + "".join(f"{i},{k % args.folds}\n" for k, i in enumerate(ids)))
        start = time.perf_counter()
        export_model(root / MODEL_FILE, cfg, args.head_bias)
        data["script_s"] = time.perf_counter() - start
        datasets = {
            m: write_dataset(root / f"dataset-{m}", root / MODEL_FILE, fold_csv, cfg, args.folds, m, shape)
            for m in sorted({1, args.folds})
        }
        image_ids = read_sample_submission(competition / SAMPLE_SUBMISSION_CSV).image_ids
        data["loader"] = loader_only(competition / TEST_IMAGES, image_ids, shape, args, device)
        data["bare"], data["predict"], data["planner"] = {}, {}, {}
        for precision in precisions:
            fp16 = precision == "fp16"
            for m, manifest in datasets.items():
                settings = KernelSettings(
                    working_dir=root / f"working-{precision}-{m}",
                    competition_dir=competition,
                    dataset_dir=manifest.parent,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    tta=args.tta,
                    device=args.device,
                    fp16=fp16,
                    time_limit=args.time_limit,
                    max_batch=args.max_batch,
                    seed=args.seed,
                )
                print(f"gpu bench: {precision}, {m} model(s), TTA {args.tta}, {args.images} images", flush=True)
                kernel, figures = kernel_predict(settings)
                data["predict"].setdefault(precision, {})[str(m)] = figures
                if m == 1:
                    batch = min(args.batch_size, args.max_batch)
                    data["bare"][precision] = bare_forward(kernel, batch, fp16, args.warmup, args.repeats)
                if m == args.folds:
                    data["planner"][precision] = planner(kernel, args.test_images, figures["setup_s"])
                del kernel
                _free(device)
    data["notes"] = notes
    data["rows"] = table_rows(data, args)
    return data


def table_rows(data: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per measurement: what, models, forward passes per image, images/s, ideal, fed, peak GPU memory."""
    views = len(tta_views(args.tta))
    rows = [
        {
            "precision": "-",
            "what": f"JPEG DataLoader only ({args.num_workers} workers, batch {args.batch_size})",
            "images/s": data["loader"]["images_per_s"],
        }
    ]
    for precision, bare in data["bare"].items():
        rows.append(
            {
                "precision": precision,
                "what": f"bare forward, batch {bare['batch']} on the device (out {bare['output_dtype']})",
                "models": 1,
                "passes/image": 1,
                "images/s": bare["images_per_s"],
                "peak GPU MiB": bare["peak_gpu_mib"],
            }
        )
        for m, figures in data["predict"][precision].items():
            passes = int(m) * views
            ideal = bare["images_per_s"] / passes
            rows.append(
                {
                    "precision": precision,
                    "what": f"kernel predict stage, {m} model(s), TTA {args.tta}",
                    "models": int(m),
                    "passes/image": passes,
                    "images/s": figures["images_per_s"],
                    "ideal images/s": ideal,
                    "fed": figures["images_per_s"] / ideal,
                    "wall s": figures["wall_s"],
                    "peak GPU MiB": figures["peak_gpu_mib"],
                }
            )
    return rows


def summary_line(data: dict[str, Any]) -> str:
    where = data["gpu"]["name"] if data["cuda"] else "CPU FIGURES, no GPU"
    parts = []
    for precision, bare in data["bare"].items():
        ensemble = max(data["predict"][precision], key=int)
        figures = data["predict"][precision][ensemble]
        row = next(r for r in data["rows"] if r["precision"] == precision and r.get("models") == int(ensemble))
        plan_ = data["planner"][precision]
        parts.append(
            f"{precision}: bare {bare['images_per_s']:.1f} img/s, {ensemble}-model predict "
            f"{figures['images_per_s']:.2f} img/s (fed {row.get('fed', 0):.2f}), planner {plan_['test_images']} images "
            f"[{plan_['tta']}] {plan_['predict_full_s']:.0f} s ({'fits' if plan_['fits'] else 'does not fit'} "
            f"{plan_['available_s']:.0f} s)"
        )
    return f"gpu bench ({where}): " + "; ".join(parts)


def sections(data: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str]]:
    where = (
        f"GPU: **{data['gpu']['name']}** ({data['gpu']['memory_gib']} GiB, capability {data['gpu']['capability']})"
        if data["cuda"]
        else "**CPU FIGURES (no GPU): a sanity run of the script, not GPU throughput.**"
    )
    setup = (
        f"{args.arch} {args.encoder} (random weights), {args.height}x{args.width}, {args.images} synthetic JPEGs, "
        f"{args.folds} folds, TTA {args.tta} ({len(tta_views(args.tta))} views), batch {args.batch_size}, "
        f"max batch {args.max_batch}, {args.num_workers} DataLoader workers."
    )
    columns = [
        "precision",
        "what",
        "models",
        "passes/image",
        "images/s",
        "ideal images/s",
        "fed",
        "wall s",
        "peak GPU MiB",
    ]
    plan_rows = [
        {
            "precision": precision,
            "test images": p["test_images"],
            "models x views": f"{p['models']} x {p['views']} ({p['tta']})",
            "s/image": p["seconds_per_image"],
            "predict s (full)": p["predict_full_s"],
            "predict s (3 views)": p["predict_3_views_s"],
            "planned": p["predict_decision"],
            "available s": p["available_s"],
            "fits": "yes" if p["fits"] else "no",
        }
        for precision, p in data["planner"].items()
    ]
    plan_columns = list(plan_rows[0]) if plan_rows else []
    plans = "\n\n".join(
        f"{precision}:\n\n```\n" + "\n".join(p["summary"]) + "\n```" for precision, p in data["planner"].items()
    )
    notes = "\n".join(f"- {n}" for n in data["notes"]) or "- none"
    problems = sorted({m for per in data["predict"].values() for f in per.values() for m in f["problems"]})
    return [
        ("Setup", f"{where}\n\n{setup}"),
        ("Throughput", markdown_table(data["rows"], columns, ".2f")),
        (
            "Planner",
            markdown_table(plan_rows, plan_columns, ".3f")
            + "\n\nThe kernel's whole plan (optional stages estimated by the kernel's own formulas from the predict "
            f"throughput; out-of-fold on {KernelSettings().oof_images} training images):\n\n" + plans,
        ),
        ("Notes", notes + ("\n\nKernel problems:\n" + "\n".join(f"- {m}" for m in problems) if problems else "")),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    data = run(args)
    cpu = "" if data["cuda"] else " (CPU FIGURES, no GPU)"
    title = f"Predict-stage throughput: {args.arch} {args.encoder} at {args.height}x{args.width}{cpu}"
    write_results(args.name, title, sections(data, args), data, args.out, info)
    print(summary_line(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
