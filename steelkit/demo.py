"""The main job end to end on the built-in synthetic competition, exactly as a competitor runs it.

synthesise -> train a preset -> export to TorchScript + manifest -> build the Kaggle dataset folder -> lay out a
simulated ``/kaggle/input`` -> run ``kernels/inference.py`` as a subprocess with networking disabled, installing the
wheel offline from the dataset folder -> score the submission on the hidden labels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .constants import COMPETITION_SLUG, SAMPLE_SUBMISSION_CSV
from .images import list_images, read_grey

__all__ = ["offline_prefix", "run_demo", "run_kernel_subprocess", "simulate_kaggle_input"]


def offline_prefix() -> list[str]:
    """``["unshare", "-rn"]`` when this machine can run a command in a new network namespace (no network at all),
    else ``[]``."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def simulate_kaggle_input(root: Path, competition: Path, dataset: Path, nested: bool = False) -> Path:
    """Lay out ``root/input`` as Kaggle mounts it: links to the competition folder and the dataset folder.

    ``nested=True`` uses the newer deeper mounts (``competitions/<slug>``, ``datasets/<owner>/<slug>``).
    """
    input_root = Path(root) / "input"
    if input_root.exists():
        shutil.rmtree(input_root)
    if nested:
        links = {
            input_root / "competitions" / COMPETITION_SLUG: competition,
            input_root / "datasets" / "owner" / dataset.name: dataset,
        }
    else:
        links = {input_root / COMPETITION_SLUG: competition, input_root / dataset.name: dataset}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(target).resolve(), target_is_directory=True)
    return input_root


def run_kernel_subprocess(
    input_root: Path,
    working_dir: Path,
    extra_args: Sequence[str] = (),
    offline: bool = True,
    timeout: float = 3600,
    fresh: bool = True,
    create: bool = True,
    preexec_fn=None,
) -> subprocess.CompletedProcess:
    """Run ``kernels/inference.py`` as Kaggle would: a fresh process, a fresh working folder (unless
    ``fresh=False``), no network, no ``PYTHONPATH``, no pip configuration; the kernel itself installs steelkit from
    the dataset's wheel with ``pip --no-index``.

    ``create=False`` leaves the working folder as it is (to rehearse one that cannot be written); ``preexec_fn`` runs
    in the child before the kernel starts (e.g. to set a file-size limit that simulates a full disk).
    """
    from .packaging import project_root

    working_dir = Path(working_dir)
    if create:
        if fresh and working_dir.exists():
            shutil.rmtree(working_dir)
        working_dir.mkdir(parents=True, exist_ok=True)
    script = project_root() / "kernels" / "inference.py"
    command = [sys.executable, str(script), "--input-root", str(input_root), "--working-dir", str(working_dir)]
    command = (offline_prefix() if offline else []) + command + list(extra_args)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull})
    cwd = working_dir if working_dir.is_dir() else Path(input_root).parent
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn
    )


def _overlay_png(competition: Path, submission: Path, labels: Path, path: Path, shape, count: int = 4) -> None:
    """A few test images with predicted masks (thick, class colours) and true masks (thin, white), in one PNG."""
    import numpy as np

    from .csvio import read_labels, read_sample_submission, read_submission
    from .kernel.report import overlay_masks, write_overlays
    from .rle import decode

    frame = read_submission(submission, read_sample_submission(competition / SAMPLE_SUBMISSION_CSV), shape)
    truth = read_labels(labels, shape).frame

    def masks_of(rows, image_id):
        out = np.zeros((4,) + tuple(shape), dtype=bool)
        for class_id, rle in rows.loc[rows["ImageId"] == image_id, ["ClassId", "EncodedPixels"]].itertuples(False):
            out[int(class_id) - 1] = decode(rle, shape).astype(bool)
        return out

    with_masks = list(dict.fromkeys(frame.loc[frame["EncodedPixels"] != "", "ImageId"]))[:count]
    tiles = [
        overlay_masks(read_grey(competition / "test_images" / i), masks_of(frame, i), masks_of(truth, i), i)
        for i in with_masks
    ]
    write_overlays(tiles, path)


def run_demo(
    workdir: Path,
    n_train: int = 600,
    n_test: int = 200,
    seed: int = 0,
    preset: str = "cpu-tiny",
    offline: bool = True,
    kernel_time_limit: float = 240.0,
) -> dict:
    """Run the whole product on a synthetic competition and print the submission's Dice with timings.

    Returns:
        The summary also written to ``workdir/demo_summary.json``.
    """
    from .config import load_recipe
    from .export import export_run
    from .packaging import build_dataset
    from .scoring import score_submission_file
    from .synth import synthesize
    from .train import train_recipe

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    competition = workdir / "competition"
    labels = workdir / "competition_test_labels.csv"

    def timed(name, fn, *args, **kwargs):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        return out

    timed("synthesise", synthesize, competition, n_train, n_test, seed, labels_path=str(labels))
    recipe = load_recipe(preset)
    runs = workdir / "runs"
    timed("train", train_recipe, recipe, competition, runs)
    timed("export", export_run, runs, competition)
    dist = workdir / "dist" / "steelkit-weights"
    timed(
        "build dataset",
        build_dataset,
        runs / "export" / "weights_manifest.json",
        dist,
        "steelkit-demo/steelkit-weights",
    )
    input_root = simulate_kaggle_input(workdir / "kaggle", competition, dist)
    working = workdir / "kaggle" / "working"
    prefix = offline_prefix() if offline else []
    print(f"\n== kernel ({' '.join(prefix) or 'network NOT disabled: unshare unavailable'})", flush=True)
    start = time.perf_counter()
    kernel_args = ["--device", "cpu", "--time-limit", str(kernel_time_limit), "--stage-submissions"]
    result = run_kernel_subprocess(input_root, working, kernel_args, offline=offline)
    timings["kernel"] = round(time.perf_counter() - start, 1)
    print(result.stdout[-4000:] + result.stderr[-2000:], flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"the kernel exited with {result.returncode}")
    submission = working / "submission.csv"
    shape = read_grey(competition / "test_images" / list_images(competition / "test_images")[0]).shape
    score = score_submission_file(submission, competition / SAMPLE_SUBMISSION_CSV, labels, shape)
    _overlay_png(competition, submission, labels, workdir / "test_predictions.png", shape)
    report = json.loads((working / "kernel_report.json").read_text())
    stage_dice = {}
    for path in sorted(working.glob("submission_*.csv"), key=lambda p: p.stat().st_mtime):
        stage_dice[path.stem.removeprefix("submission_")] = round(
            score_submission_file(path, competition / SAMPLE_SUBMISSION_CSV, labels, shape).mean, 4
        )
    stage_seconds = {log["name"]: (log["outcome"], round(log["actual_s"] or 0.0, 1)) for log in report["timeline"]}
    print("\nkernel stages (outcome, seconds):", json.dumps(stage_seconds), flush=True)
    print(f"Dice of the submission written after each stage: {json.dumps(stage_dice)}", flush=True)
    summary = {
        "dice": score.mean,
        "per_class": score.per_class,
        "all_empty": score.all_empty,
        "per_class_all_empty": score.per_class_all_empty,
        "n_pairs": score.n_pairs,
        "timings_s": timings,
        "kernel_outcome": report["outcome"],
        "kernel_stages": stage_seconds,
        "dice_after_stage": stage_dice,
        "oof_dice_per_stage": report["oof_dice"],
        "kernel_problems": report["problems"],
        "network_disabled": bool(prefix),
        "submission": str(submission),
    }
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    total = sum(timings.values())
    print(
        f"\nsteelkit demo: submission {score.summary()}; "
        f"{'beats' if score.mean > score.all_empty else 'DOES NOT beat'} the all-empty submission; "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f"; total {total:.0f}s; overlay PNG {workdir / 'test_predictions.png'}",
        flush=True,
    )
    return summary
