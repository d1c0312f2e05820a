"""Quality ablation: what each part of the pipeline adds to the competition Dice on hidden test labels, at what cost.

Per seed: synthesise a competition (:func:`steelkit.synth.synthesize`, the real Kaggle layout, hidden test labels
written outside the competition folder), train a recipe (:func:`steelkit.train.train_recipe`), export it
(:func:`steelkit.export.export_run`: TorchScript + ``weights_manifest.json``), then run the real kernel
(:func:`steelkit.kernel.run_kernel`, in-process) once per configuration and score every submission it wrote on the
hidden labels (:func:`steelkit.scoring.score_submission_file`). The rows are cumulative:

====  ======================  =======================================================================================
row   key                     what is scored
====  ======================  =======================================================================================
1     all_empty               the all-empty submission
2     single_fold             the first segmenter fold alone, no TTA, pixel threshold 0.5, no minimum area/component
3     flip_tta                + flip TTA (the kernel's default views)
4     fold_ensemble           + every fold of every segmenter job
5a    manifest_postprocess    + the export-time threshold / minimum-area search (the manifest's ``postprocess``)
5     kernel_search           + the kernel's out-of-fold search on its own ensemble, gate ``none``
6     classifier_gating       + the classifiers, gate ``auto`` (none / hard / soft, chosen on out-of-fold Dice)
7     pseudo_labels           + pseudo-label rounds
8     weight_averaging        + weight averaging
9     full_kernel             the kernel as shipped: default settings, every model, ``--kernel-time-limit``
====  ======================  =======================================================================================

Rows 2-8 run with an unlimited budget (nothing is planned away; the kernel still stops an optional stage at 1.5x its
estimate + 10 s). Rows 2, 3, 4 and 5a/5 are separate kernel runs (filtered copies of the export folder: manifest and
links to the same TorchScript files); rows 6, 7 and 8 are one run with ``stage_submissions``: the submission current
after its search, pseudo and averaging stages. The kernel only writes after a stage that improves the out-of-fold
Dice, so a stage that is not kept leaves the previous submission: the row then repeats the previous Dice and says
"not kept, no change". A row's cost is the kernel seconds it adds to the previous row (the export-time search for 5a).

Writes ``<out>/<name>.md``, ``<out>/<name>.json`` (every per-seed figure) and ``<out>/<name>.png``.

    python bench/quality.py       # defaults: 3 seeds x 200 train / 100 test at 256x1600, about 25-30 min on 2 CPU cores
    python bench/quality.py --mask-source ../shared/severstal/train_real_partial.csv --name quality_real_masks
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, markdown_table, write_results

#: the bench recipe: the cpu-tiny segmenter + a small "any defect" classifier (the gating row needs a classifier)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "recipes" / "bench-tiny.yaml"
#: the ablation rows in order: (key, number, label)
ROWS: tuple[tuple[str, str, str], ...] = (
    ("all_empty", "1", "all-empty submission"),
    ("single_fold", "2", "one fold's segmenter, no TTA, threshold 0.5, no min area"),
    ("flip_tta", "3", "+ flip TTA"),
    ("fold_ensemble", "4", "+ fold ensemble (every fold)"),
    ("manifest_postprocess", "5a", "+ export-time threshold/min-area search (manifest)"),
    ("kernel_search", "5", "+ kernel OOF threshold/min-area search (gate none)"),
    ("classifier_gating", "6", "+ classifier gating (gate auto)"),
    ("pseudo_labels", "7", "+ pseudo-label rounds"),
    ("weight_averaging", "8", "+ weight averaging"),
    ("full_kernel", "9", "full kernel: default settings, time limit"),
)
#: an unlimited kernel budget for the ablation rows (the full-kernel row gets --kernel-time-limit)
UNLIMITED_S = 1e7
#: the post-processing of rows 2-4: pixel threshold 0.5, nothing removed, no label gate
NEUTRAL_POSTPROCESS = {
    "pixel_threshold": [0.5] * 4,
    "min_area": [0] * 4,
    "min_component": [0] * 4,
    "label_threshold": [0.0] * 4,
    "label_source": "max_prob",
    "source": "bench/quality.py: neutral (pixel threshold 0.5, no minimum area, no gate)",
}
#: submission files (``submission_<name>.csv``) each kernel stage may write, in pipeline order
STAGE_WRITES = {"predict": ("ensemble",), "search": ("search",), "pseudo": ("pseudo",), "averaging": ("averaging",)}
#: kernel stages in pipeline order
KERNEL_STAGES = ("predict", "oof", "search", "pseudo", "averaging", "write")


@dataclasses.dataclass(frozen=True)
class KernelRun:
    """One kernel run of the ablation.

    Attributes:
        name: the run's folder name.
        models: ``first_segmenter``, ``segmenters`` or ``all`` models of the manifest.
        postprocess: ``neutral`` (:data:`NEUTRAL_POSTPROCESS`) or ``manifest`` (the export's search).
        settings: :class:`steelkit.kernel.KernelSettings` fields.
        rows: ``(row key, last kernel stage of the row)``: the row's submission is the one current after that stage.
    """

    name: str
    models: str
    postprocess: str
    settings: dict[str, Any]
    rows: tuple[tuple[str, str], ...]


def kernel_runs(time_limit: float) -> list[KernelRun]:
    """The kernel runs of one seed, in order (see the module docstring)."""
    from steelkit.kernel import KernelSettings

    tta = KernelSettings().tta
    unlimited = {"time_limit": UNLIMITED_S}
    return [
        KernelRun("single_fold", "first_segmenter", "neutral", {**unlimited, "tta": "none", "stages": ()},
                  (("single_fold", "predict"),)),
        KernelRun("flip_tta", "first_segmenter", "neutral", {**unlimited, "tta": tta, "stages": ()},
                  (("flip_tta", "predict"),)),
        KernelRun("fold_ensemble", "segmenters", "neutral", {**unlimited, "stages": ()},
                  (("fold_ensemble", "predict"),)),
        KernelRun("search", "segmenters", "manifest", {**unlimited, "stages": ("oof", "search"), "gate": "none"},
                  (("manifest_postprocess", "predict"), ("kernel_search", "search"))),
        KernelRun("gating_pseudo_averaging", "all", "manifest", {**unlimited, "gate": "auto"},
                  (("classifier_gating", "search"), ("pseudo_labels", "pseudo"), ("weight_averaging", "averaging"))),
        KernelRun("full_kernel", "all", "manifest", {"time_limit": time_limit}, (("full_kernel", "write"),)),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed")
    parser.add_argument("--n-train", type=int, default=200, help="synthetic train images per seed")
    parser.add_argument("--n-test", type=int, default=100, help="synthetic test images per seed (hidden labels)")
    parser.add_argument("--height", type=int, default=256, help="image height (the real 256)")
    parser.add_argument("--width", type=int, default=1600, help="image width (the real 1600)")
    parser.add_argument("--image-size", default=None, metavar="HxW", help="both at once, e.g. 128x800")
    parser.add_argument(
        "--config", "--preset", dest="config", default=str(DEFAULT_CONFIG), help="a preset name or a recipe YAML"
    )
    parser.add_argument("--epochs", type=int, default=None, help="optim.epochs of every job (None: the recipe's)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every job, e.g. data.scale=0.5"
    )
    parser.add_argument("--mask-source", default=None, help="a Severstal train.csv to borrow real mask geometry from")
    parser.add_argument(
        "--kernel-time-limit", type=float, default=120.0, help="time limit of the full-kernel row (row 9), seconds"
    )
    parser.add_argument("--device", default=None, help="training and kernel device (None: CUDA when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's choice, one per core). 1 because on 2 shared cores torch's 2 threads ran "
        "a training step 6x slower than 1 thread while another process was busy (1.65x faster when the machine was "
        "idle): 1 keeps the defaults near 30 minutes either way",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <name>.md/.json/.png go")
    parser.add_argument("--name", default="quality", help="file stem of the results")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where each seed's competition, runs and kernel outputs go "
        "(None: a temporary folder, deleted seed by seed)"
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep each seed's work folder")
    parser.add_argument("--verbose", action="store_true", help="show the kernel's own log (else <run>/kernel.log)")
    args = parser.parse_args(argv)
    if args.image_size:
        try:
            args.height, args.width = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            parser.error(f"--image-size must look like 256x1600, got {args.image_size!r}")
    if args.mask_source and not Path(args.mask_source).is_file():
        parser.error(f"--mask-source {args.mask_source}: no such file")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def load_bench_recipe(args: argparse.Namespace, seed: int):
    """The recipe with ``--set``, ``--epochs`` and the seed merged into every job."""
    from steelkit.config import deep_merge, load_recipe, parse_overrides

    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides = deep_merge(overrides, {"optim": {"epochs": args.epochs}})
    return load_recipe(args.config, deep_merge(overrides, {"seed": seed}))


# ------------------------------------------------------------------------------------------------------ one seed
def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers), user + system: with the wall
    seconds, it shows how much of a slow run was other load on the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _say(seed: int, message: str) -> None:
    print(f"[quality seed {seed}] {message}", flush=True)


@contextlib.contextmanager
def _timed_export_search(box: dict[str, float]):
    """Time the export's ensemble post-processing search (the cost of row 5a) while :func:`export_run` runs."""
    import steelkit.export as export

    original = export.search_postprocess

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            box["search_s"] = box.get("search_s", 0.0) + time.perf_counter() - start

    export.search_postprocess = timed
    try:
        yield box
    finally:
        export.search_postprocess = original


def filtered_dataset(export_dir: Path, out_dir: Path, models: str, postprocess: str) -> tuple[Path, list[str]]:
    """A dataset folder holding some of the export's models: links to its files and a rewritten manifest.

    Args:
        models: ``first_segmenter``, ``segmenters`` or ``all``.
        postprocess: ``neutral`` or ``manifest``.

    Returns:
        the folder and the names of the models in it.
    """
    from steelkit.manifest import MANIFEST_NAME, load_manifest, save_manifest

    manifest = load_manifest(export_dir / MANIFEST_NAME)
    segmenters = [m for m in manifest.models if m.kind == "segmenter"]
    chosen = {"first_segmenter": segmenters[:1], "segmenters": segmenters, "all": list(manifest.models)}[models]
    post = NEUTRAL_POSTPROCESS if postprocess == "neutral" else manifest.postprocess
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [m.file for m in chosen] + list(manifest.files):
        link = out_dir / name
        if not link.exists():
            link.symlink_to((export_dir / name).resolve())
    filtered = dataclasses.replace(manifest, models=tuple(chosen), postprocess=dict(post), folder=out_dir)
    save_manifest(filtered, out_dir / MANIFEST_NAME)
    return out_dir, [m.name for m in chosen]


def _submission_after(working: Path, stage: str) -> str | None:
    """Which ``submission_<x>.csv`` was current after kernel stage ``stage`` (``None``: still the all-empty one)."""
    current = None
    for name in KERNEL_STAGES:
        for prefix in STAGE_WRITES.get(name, ()):
            written = sorted(working.glob(f"submission_{prefix}*.csv"), key=lambda p: p.stem)
            if prefix == "pseudo":  # pseudo1, pseudo2, ...: the last round kept
                written = sorted(written, key=lambda p: int(p.stem.removeprefix("submission_pseudo") or 0))
            if written:
                current = written[-1].stem.removeprefix("submission_")
        if name == stage:
            break
    return current


def _seconds_through(report: dict, stage: str) -> float:
    """Kernel seconds to the end of ``stage``: locating, the all-empty submission, loading, every stage up to it."""
    total = report["stages"].get("locate and write all-empty", 0.0) + report["stages"].get("verify and load models", 0)
    for log in report["timeline"]:
        total += log["actual_s"] or 0.0
        if log["name"] == stage:
            break
    return total


def _stage_log(report: dict, stage: str) -> dict:
    return next((log for log in report["timeline"] if log["name"] == stage), {})


def _row_note(row: str, report: dict, written: str | None, previous_written: str | None) -> tuple[bool | None, str]:
    """Whether the row's added stage was kept (``None``: nothing to keep), and a short note of what it did.

    Args:
        written, previous_written: the submission current after this row's stage and after the previous row's stage
            of the same kernel run (``None``: the all-empty one, or the row is the run's first).
    """
    if row in ("single_fold", "flip_tta", "fold_ensemble", "manifest_postprocess", "full_kernel"):
        log = _stage_log(report, "predict")
        note = f"predict {log.get('outcome', '?')} (TTA {log.get('variant') or '-'})"
        if row == "full_kernel":
            outcomes = ", ".join(f"{x['name']} {x['outcome']}" for x in report["timeline"][1:-1])
            note += f", {outcomes}; written by {report.get('counts', {}).get('written_by', '?')}"
        return None, note
    stage = {"kernel_search": "search", "classifier_gating": "search", "pseudo_labels": "pseudo"}.get(row, "averaging")
    log = _stage_log(report, stage)
    note = f"{stage} {log.get('outcome', 'not run')}"
    effect = log.get("effect", {})
    if row == "kernel_search":
        kept = written != previous_written
    elif row == "classifier_gating":
        gate = report.get("search", {}).get("chosen_gate")
        kept = written == "search" and gate not in (None, "none")
        note += f", gate {gate}"
    elif row == "pseudo_labels":
        kept = written != previous_written
        rounds = report.get("pseudo", [])
        note += "; " + "; ".join(f"{r.get('pseudo_images', 0)} images: {r.get('outcome', '?')}" for r in rounds)
    else:
        kept = written != previous_written
        chosen = [f"{a.get('model')}: {a.get('outcome', '?')}" for a in report.get("averaging", [])]
        note += "; " + (", ".join(chosen) if chosen else "no candidates")
    if stage == "search" and "oof_dice_before" in effect:
        note += f", OOF {effect['oof_dice_before']:.4f} -> {effect['oof_dice_after']:.4f}"
    if not kept:
        note += "; not kept, no change"
    return kept, note


def run_seed(args: argparse.Namespace, seed: int, workdir: Path, warmup: bool = False) -> dict:
    """Synthesise, train, export and evaluate every row for one seed; returns every figure of it.

    ``warmup``: first run the single-fold kernel once, unscored, so that the process's one-time costs (the first
    TorchScript load and forward passes) are not charged to a row.
    """
    from steelkit.constants import SAMPLE_SUBMISSION_CSV
    from steelkit.csvio import read_sample_submission, write_submission
    from steelkit.export import export_run
    from steelkit.kernel import KernelSettings, run_kernel
    from steelkit.scoring import score_submission_file
    from steelkit.synth import synthesize
    from steelkit.train import train_recipe

    timings: dict[str, Any] = {}
    cpu: dict[str, float] = {"start": _cpu_s()}
    competition = workdir / "competition"
    labels = workdir / "competition_test_labels.csv"
    shape = (args.height, args.width)

    _say(seed, f"synthesising {args.n_train} train + {args.n_test} test images at {args.height}x{args.width}")
    start = time.perf_counter()
    synth = synthesize(
        competition, args.n_train, args.n_test, seed, args.height, args.width, args.mask_source,
        labels_path=str(labels), progress=False,
    )  # fmt: skip
    timings["synthesise"] = time.perf_counter() - start

    recipe = load_bench_recipe(args, seed)
    _say(seed, f"training {recipe.name}: jobs {[j.name for j in recipe.jobs]}")
    start, cpu["train"] = time.perf_counter(), _cpu_s()
    summary = train_recipe(recipe, competition, workdir / "runs", device=args.device, progress=False)
    timings["train"] = time.perf_counter() - start
    cpu["train"] = _cpu_s() - cpu["train"]
    timings["train_jobs"] = {name: job.get("seconds") for name, job in summary["jobs"].items()}
    val_metric = {name: job.get("mean_metric") for name, job in summary["jobs"].items()}

    start = time.perf_counter()
    with _timed_export_search({}) as export_search:
        export_run(workdir / "runs", competition)
    timings["export"] = time.perf_counter() - start
    timings["export_search"] = export_search.get("search_s", 0.0)
    export_dir = workdir / "runs" / "export"

    def score(path: Path) -> dict:
        s = score_submission_file(path, competition / SAMPLE_SUBMISSION_CSV, labels, shape)
        return {"dice": s.mean, "per_class": {str(c): d for c, d in s.per_class.items()}, "n_pairs": s.n_pairs}

    rows: dict[str, dict] = {}
    empty = workdir / "submission_all_empty.csv"
    write_submission(read_sample_submission(competition / SAMPLE_SUBMISSION_CSV), {}, empty, shape)
    rows["all_empty"] = {**score(empty), "kernel_s": 0.0, "added_s": 0.0, "kept": None, "note": "no model"}

    def kernel(run: KernelRun, working: Path) -> dict:
        dataset = export_dir
        if not (run.models == "all" and run.postprocess == "manifest"):
            dataset, _ = filtered_dataset(export_dir, workdir / "datasets" / run.name, run.models, run.postprocess)
        settings = KernelSettings(
            competition_dir=competition, dataset_dir=dataset, working_dir=working, device=args.device,
            stage_submissions=True, overlays=0, seed=seed, **run.settings,
        )  # fmt: skip
        working.mkdir(parents=True, exist_ok=True)
        if args.verbose:
            return run_kernel(settings, progress=False)
        with open(working / "kernel.log", "w") as log, contextlib.redirect_stdout(log):
            return run_kernel(settings, progress=False)

    runs = kernel_runs(args.kernel_time_limit)
    if warmup:  # the process's first kernel run pays one-time costs that belong to no row: pay them here
        start = time.perf_counter()
        kernel(runs[0], workdir / "kernel" / "warmup")
        timings["kernel_warmup"] = time.perf_counter() - start
        _say(seed, f"kernel warm-up run (not scored): {timings['kernel_warmup']:.1f}s")
    kernel_reports: dict[str, dict] = {}
    timings["kernel"] = {}
    cpu["kernel"] = _cpu_s()
    previous = "all_empty"
    for run in runs:
        working = workdir / "kernel" / run.name
        start = time.perf_counter()
        report = kernel(run, working)
        wall = time.perf_counter() - start
        timings["kernel"][run.name] = wall
        kernel_reports[run.name] = {
            "outcome": report["outcome"],
            "stages": report["stages"],
            "timeline": [
                {
                    k: log[k]
                    for k in ("name", "outcome", "estimated_s", "actual_s", "units_planned", "units_done", "variant")
                }
                for log in report["timeline"]
            ],
            "oof_dice": report["oof_dice"],
            "postprocess": report["postprocess"],
            "chosen_gate": report.get("search", {}).get("chosen_gate"),
            "pseudo": [{k: v for k, v in r.items() if k != "finetune"} for r in report["pseudo"]],
            "averaging": report["averaging"],
            "problems": report["problems"],
            "models": report["models"],
        }
        previous_written = None
        for row, stage in run.rows:
            written = _submission_after(working, stage)
            if row == "full_kernel":
                path = working / "submission.csv"
            else:  # None: nothing written yet after the all-empty submission
                path = empty if written is None else working / f"submission_{written}.csv"
            result = score(path)
            kernel_s = report["stages"]["total"] if row == "full_kernel" else _seconds_through(report, stage)
            if row == "manifest_postprocess":  # the manifest's post-processing costs the export-time search only
                added = timings["export_search"]
            elif row == "full_kernel":
                added = None
            else:
                added = kernel_s - rows[previous]["kernel_s"]
            kept, note = _row_note(row, report, written, previous_written)
            rows[row] = {
                **result, "kernel_s": kernel_s, "added_s": added, "kept": kept, "note": note,
                "submission": f"{run.name}/{path.name}",
            }  # fmt: skip
            previous_written, previous = written, row
            _say(seed, f"{row:<21} Dice {result['dice']:.4f}  ({note}; kernel {kernel_s:.1f}s)")
        if report["problems"]:
            _say(seed, f"kernel run {run.name} reported problems: {report['problems']}")
    timings["total"] = sum(v for k, v in timings.items() if isinstance(v, float) and k != "export_search")
    timings["total"] += sum(timings["kernel"].values())
    cpu["kernel"] = _cpu_s() - cpu["kernel"]
    timings["cpu"] = {"train": cpu["train"], "kernel_runs": cpu["kernel"], "total": _cpu_s() - cpu["start"]}
    return {
        "seed": seed,
        "rows": rows,
        "timings_s": timings,
        "val_metric": val_metric,
        "synth": {k: synth[k] for k in ("train", "test")},
        "kernel_runs": kernel_reports,
        "hidden_label_rows": len(labels.read_text().splitlines()) - 1,
    }


# ------------------------------------------------------------------------------------------------------ summary
def _stats(values: Sequence[float]) -> dict[str, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "min": min(values), "max": max(values)}


def summarize(seeds: list[dict]) -> list[dict]:
    """One summary per row over the seeds: Dice, delta vs the previous row, per class, seconds, kept count, verdict."""
    out = []
    for i, (key, number, label) in enumerate(ROWS):
        per_seed = [s["rows"][key] for s in seeds]
        dice = [r["dice"] for r in per_seed]
        row: dict[str, Any] = {"key": key, "row": number, "label": label, "dice": _stats(dice)}
        row["per_class"] = {c: _stats([r["per_class"][c] for r in per_seed]) for c in ("1", "2", "3", "4")}
        if i:
            prev = ROWS[i - 1][0]
            deltas = [r["dice"] - s["rows"][prev]["dice"] for r, s in zip(per_seed, seeds)]
            row["delta"] = _stats(deltas)
            row["delta_per_seed"] = deltas
            row["pays_in_seeds"] = sum(d > 0 for d in deltas)
        row["added_s"] = _stats([r["added_s"] for r in per_seed])
        row["kernel_s"] = _stats([r["kernel_s"] for r in per_seed])
        kept = [r["kept"] for r in per_seed if r["kept"] is not None]
        row["kept_in_seeds"] = sum(kept) if kept else None
        row["notes_per_seed"] = [r["note"] for r in per_seed]
        row["verdict"] = _verdict(row, len(seeds))
        out.append(row)
    return out


def _verdict(row: dict, n: int) -> str:
    if "delta" not in row:
        return "baseline"
    delta = row["delta"]["mean"]
    parts = ["pays" if delta > 0 else "DOES NOT PAY"]
    if n > 1:
        parts.append(f"better in {row['pays_in_seeds']}/{n} seeds")
    if row["kept_in_seeds"] == 0 and row["key"] not in ("full_kernel",):
        parts.append("not kept, no change")
    elif row["kept_in_seeds"] is not None and row["kept_in_seeds"] < n and row["key"] != "full_kernel":
        parts.append(f"kept in {row['kept_in_seeds']}/{n} seeds")
    return "; ".join(parts)


def _fmt(value: float | None, spec: str = ".4f", sign: bool = False) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return format(value, ("+" if sign else "") + spec)


def tables(summary: list[dict], seeds: list[dict], args: argparse.Namespace) -> list[tuple[str, str]]:
    """The Markdown sections of the results page."""
    n = len(seeds)
    main_rows = []
    for row in summary:
        d, delta = row["dice"], row.get("delta")
        main_rows.append(
            {
                "row": row["row"],
                "what": row["label"] + (f" ({args.kernel_time_limit:.0f} s)" if row["key"] == "full_kernel" else ""),
                "Dice mean": _fmt(d["mean"]),
                "std": _fmt(d["std"]),
                "min": _fmt(d["min"]),
                "max": _fmt(d["max"]),
                "delta vs previous": _fmt(delta["mean"], sign=True) if delta else None,
                "c1": _fmt(row["per_class"]["1"]["mean"]),
                "c2": _fmt(row["per_class"]["2"]["mean"]),
                "c3": _fmt(row["per_class"]["3"]["mean"]),
                "c4": _fmt(row["per_class"]["4"]["mean"]),
                "added s": _fmt(row["added_s"]["mean"], ".1f"),
                "kernel s": _fmt(row["kernel_s"]["mean"], ".1f"),
                "verdict": row["verdict"],
            }
        )
    columns = ["row", "what", "Dice mean", "std", "min", "max", "delta vs previous", "c1", "c2", "c3", "c4"]
    columns += ["added s", "kernel s", "verdict"]
    sections = [(f"Competition Dice on the hidden test labels (mean over {n} seed(s): {args.seeds})",
                 markdown_table(main_rows, columns))]  # fmt: skip

    class_rows = []
    for row in summary:
        entry = {"row": row["row"], "what": row["label"]}
        for c in ("1", "2", "3", "4"):
            s = row["per_class"][c]
            entry[f"class {c}"] = f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"
        class_rows.append(entry)
    sections.append(("Per class: mean ± std [min, max] over seeds",
                     markdown_table(class_rows, ["row", "what"] + [f"class {c}" for c in "1234"])))  # fmt: skip

    seed_rows = []
    for row in summary:
        entry = {"row": row["row"], "what": row["label"]}
        for s in seeds:
            r = s["rows"][row["key"]]
            entry[f"seed {s['seed']}"] = f"{r['dice']:.4f}"
        entry["what the added stage did (per seed)"] = " / ".join(row["notes_per_seed"])
        seed_rows.append(entry)
    seed_cols = ["row", "what"] + [f"seed {s['seed']}" for s in seeds] + ["what the added stage did (per seed)"]
    sections.append(("Per seed", markdown_table(seed_rows, seed_cols)))

    stage_rows = []
    runs = [r.name for r in kernel_runs(args.kernel_time_limit)]
    for name in runs:
        entry: dict[str, Any] = {"kernel run": name}
        for stage in KERNEL_STAGES:
            logs = [next((x for x in s["kernel_runs"][name]["timeline"] if x["name"] == stage), None) for s in seeds]
            logs = [x for x in logs if x is not None]
            if not logs:
                continue
            secs = _stats([x["actual_s"] for x in logs])["mean"]
            outcomes = sorted({x["outcome"] for x in logs})
            entry[stage] = f"{secs:.1f} ({', '.join(outcomes)})"
        entry["total"] = _fmt(_stats([s["kernel_runs"][name]["stages"]["total"] for s in seeds])["mean"], ".1f")
        stage_rows.append(entry)
    sections.append(("Kernel stage seconds (mean over seeds) and outcomes, per kernel run",
                     markdown_table(stage_rows, ["kernel run", *KERNEL_STAGES, "total"])))  # fmt: skip

    time_rows = []
    for s in seeds:
        t = s["timings_s"]
        time_rows.append(
            {
                "seed": s["seed"],
                "synthesise s": f"{t['synthesise']:.1f}",
                "train s": f"{t['train']:.1f} (" + ", ".join(f"{k} {v:.0f}" for k, v in t["train_jobs"].items()) + ")",
                "val metric": ", ".join(f"{k} {v:.4f}" for k, v in s["val_metric"].items()),
                "export s": f"{t['export']:.1f} (search {t['export_search']:.1f})",
                "kernel runs s": f"{sum(t['kernel'].values()):.1f}",
                "total s": f"{t['total']:.1f}",
                "CPU s (train / kernels / all)": "{train:.0f} / {kernel_runs:.0f} / {total:.0f}".format(**t["cpu"]),
            }
        )
    sections.append(("Timings per seed", markdown_table(time_rows, list(time_rows[0]))))
    sections.append(("How to read this", _NOTES.format(limit=args.kernel_time_limit)))
    return sections


_NOTES = """\
- Rows are cumulative; "delta vs previous" is the mean over seeds of (row - previous row). A row whose mean delta is
  <= 0 is marked DOES NOT PAY. "added s" is the kernel time the row adds to the previous one (row 5a: the
  export-time search, which runs once offline; row 6: the whole classifier-gated predict + OOF + search minus row 5's;
  row 9: none, it is the shipped kernel on its own); "kernel s" is the kernel time to produce the row's submission.
- Rows 2-8 run with an unlimited budget; the kernel still stops an optional stage at 1.5 x its estimate + 10 s
  ("stopped at deadline"). Row 9 is the kernel with its default settings and a {limit:.0f} s time limit: its planner may
  shrink or drop stages to fit.
- The kernel writes a new submission only after a stage that improves the out-of-fold Dice (search: when the settings
  changed; pseudo: a round that does not lower it; averaging: when an average wins). A stage that is not kept leaves
  the previous submission: its row repeats the previous Dice ("not kept, no change").
- The out-of-fold Dice the kernel decides on is measured on held-out training images at reduced resolution; the test
  Dice here is on the hidden test labels at full resolution, so a stage can be kept and still lower the test Dice.
"""


def plot(summary: list[dict], path: Path, title: str) -> Path | None:
    """Bar chart of the mean Dice per row with min-max error bars, and the seconds each row adds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['row']}. {r['label']}" for r in summary]
    means = np.array([r["dice"]["mean"] for r in summary])
    low = means - np.array([r["dice"]["min"] for r in summary])
    high = np.array([r["dice"]["max"] for r in summary]) - means
    colors = ["tab:gray"] + ["tab:green" if r["delta"]["mean"] > 0 else "tab:red" for r in summary[1:]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 1.4]})
    y = np.arange(len(summary))[::-1]
    ax.barh(y, means, xerr=[low, high], color=colors, capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    span = max(float(means.max() - (means - low).min()), 0.01)
    ax.set_xlim(max(0.0, float((means - low).min()) - 0.3 * span), min(1.0, float((means + high).max()) + 0.3 * span))
    ax.set_xlabel("competition Dice on hidden test labels (mean; bars: min-max over seeds)")
    ax.axvline(means[0], color="tab:gray", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    for yi, m in zip(y, means):
        ax.text(m, yi, f" {m:.4f}", va="center", fontsize=7)
    added = [r["added_s"]["mean"] or 0.0 for r in summary]
    bx.barh(y, added, color=colors)
    bx.set_yticks(y, [r["row"] for r in summary], fontsize=8)
    bx.set_xlabel("seconds the row adds (mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="steelkit-quality-"))
    print(
        f"bench/quality.py: seeds {args.seeds}, {args.n_train} train / {args.n_test} test images at "
        f"{args.height}x{args.width}, recipe {args.config}, mask source {args.mask_source or 'procedural'}, "
        f"work folder {base}",
        flush=True,
    )
    seeds = []
    try:
        for seed in args.seeds:
            workdir = base / f"seed{seed}"
            if workdir.exists():
                shutil.rmtree(workdir)
            result = run_seed(args, seed, workdir, warmup=not seeds)
            seeds.append(result)
            t, rows = result["timings_s"], result["rows"]
            _say(
                seed,
                f"done: all-empty {rows['all_empty']['dice']:.4f}, single fold {rows['single_fold']['dice']:.4f}, "
                f"full kernel {rows['full_kernel']['dice']:.4f}; synthesise {t['synthesise']:.0f}s, train "
                f"{t['train']:.0f}s, export {t['export']:.0f}s, kernel runs {sum(t['kernel'].values()):.0f}s; "
                f"total {t['total']:.0f}s",
            )
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    summary = summarize(seeds)
    masks = f"real masks from {Path(args.mask_source).name}" if args.mask_source else "procedural masks"
    title = (
        f"Quality ablation: {len(seeds)} seed(s), {args.n_train} train / {args.n_test} test synthetic images at "
        f"{args.height}x{args.width}, {masks}, recipe {Path(args.config).stem}"
    )
    sections = tables(summary, seeds, args)
    png = plot(summary, Path(args.out) / f"{args.name}.png", title)
    if png is not None:
        sections.insert(1, ("Figure", f"![Dice per row]({png.name})"))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    data = {
        "settings": settings,
        "rows": summary,
        "seeds": seeds,
        "wall_s": time.perf_counter() - start,
        "figure": None if png is None else png.name,
    }
    write_results(args.name, title, sections, data, out_dir=args.out)
    print("\n" + sections[0][1] + "\n", flush=True)
    print(f"bench/quality.py: {len(seeds)} seed(s) in {time.perf_counter() - start:.0f} s", flush=True)
    return data


if __name__ == "__main__":
    main()
