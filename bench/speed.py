"""Speed of steelkit's pure core and of the kernel's per-image work, against reference implementations.

Side by side in one process, on the same inputs, as ratios (reference time / steelkit time):

* RLE encode and decode of full-size (256x1600) masks against the loop-based ``mask2rle`` / ``rle2mask`` that most
  public Severstal kernels used (Fortran-order flatten, pad, find changes; decode by a Python loop over runs);
* post-processing (threshold, component removal, whole-mask minimum area) against the per-component Python loop of
  the most copied Severstal kernel (``cv2.connectedComponents`` then ``component == c`` for every component);
* the kernel's joint search (pixel threshold x component minimum size x label gate x minimum area,
  :func:`steelkit.search.search_full`) against a naive nested loop that post-processes and re-scores every image for
  every combination, checking that both pick the same values and score every cell the same;
* the kernel's per-image work besides the model (JPEG decode, normalisation, flip TTA and merge, uint8 conversion,
  cache, confidence statistics, post-processing, RLE, CSV) on one core, against the forward time of a tiny Unet and
  of a Unet-EfficientNet-B3 (both TorchScript, 256x1600, batch 1);
* peak memory of predicting 1,000 full-size test images through the kernel's predict path (in a subprocess).

Masks are real: ``../shared/severstal/train_real_partial.csv`` (real train masks) and
``public_test_predictions_khornlund.csv`` (a top team's predictions), with ``steelkit.synth`` masks when those files
are absent. Probability maps are blurred real masks with smooth noise and false-positive blobs, stored as uint8.

Run from the repository root (about 10 minutes on 2 CPU cores; ``--quick`` for a seconds-long smoke run)::

    python bench/speed.py
    python bench/speed.py --quick --out /tmp/speed

Writes ``bench/results/speed.md`` and ``bench/results/speed.json`` (or under ``--out``) and exits with status 1 when
a reference and steelkit disagree.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

#: the real Severstal label files of this workspace (outside the repository)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "severstal"
#: full image size ``(H, W)``
SHAPE = (256, 1600)
#: goals of the issue: speed-up of RLE encode and decode, of the search, and the kernel's non-model work per image
GOALS = {"rle": 10.0, "search": 50.0, "overhead_ms": 10.0}
#: the post-processing compared: pixel threshold, component minimum size of the reference (kept when ``> min_size``)
#: and whole-mask minimum area, per class
POST_THRESHOLD = 0.5
POST_MIN_SIZE = (600, 600, 1000, 2000)
POST_MIN_AREA = (410, 820, 820, 1640)
#: the searched arrays' size: the kernel's out-of-fold scale 0.25
SEARCH_SHAPE = (64, 400)
#: a small grid (threshold x component size x label gate x area fractions) beside the kernel's own
SMALL_GRID = {
    "thresholds": (0.3, 0.4, 0.5, 0.6, 0.7),
    "min_components": (0, 16, 64),
    "label_thresholds": (0.0, 0.5, 0.7),
    "area_fractions": (0.0, 0.001, 0.004),
}
#: the tiny model: the cpu-tiny preset's architecture (Unet, ResNet-18, slim decoder)
TINY = {"encoder": "resnet18", "decoder_channels": (128, 64, 32, 16, 16)}
#: ImageNet normalisation, as the manifest stores it
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------------
# Reference implementations, written the way public Severstal kernels wrote them


def mask2rle(img: np.ndarray) -> str:
    """The RLE encoder of the public kernels: Fortran-order flatten, pad with zeros, find the changes."""
    pixels = img.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def rle2mask(mask_rle: str, shape: tuple[int, int] = (1600, 256)) -> np.ndarray:
    """The RLE decoder of the public kernels: a Python loop over runs; ``shape`` is ``(W, H)`` as they wrote it, and
    the ``(H, W)`` result is a transposed view."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape).T


def post_process(probability: np.ndarray, threshold: float, min_size: int) -> tuple[np.ndarray, int]:
    """The post-processing of the most copied Severstal kernel: threshold, then keep every connected component with
    more than ``min_size`` pixels, one ``component == c`` mask per component."""
    mask = cv2.threshold(probability, threshold, 1, cv2.THRESH_BINARY)[1]
    num_component, component = cv2.connectedComponents(mask.astype(np.uint8))
    predictions = np.zeros(probability.shape, np.float32)
    num = 0
    for c in range(1, num_component):
        p = component == c
        if p.sum() > min_size:
            predictions[p] = 1
            num += 1
    return predictions, num


def post_process_area(probability: np.ndarray, threshold: float, min_size: int, min_area: int) -> np.ndarray:
    """:func:`post_process` followed by the whole-mask minimum area many kernels added: an image's mask with fewer
    than ``min_area`` pixels is emptied."""
    predictions, _ = post_process(probability, threshold, min_size)
    if predictions.sum() < min_area:
        predictions[:] = 0
    return predictions


def naive_post_process(
    probability: np.ndarray, threshold: float, min_component: float, label_threshold: float, min_area: float
) -> np.ndarray:
    """One cell of the search grid on one uint8 (x 255) map, with the per-component loop of :func:`post_process` and
    steelkit's conventions (pixel on when ``p >= threshold``, component kept when ``>= min_component`` pixels, class
    dropped when the max probability is below ``label_threshold`` or the mask has fewer than ``min_area`` pixels)."""
    predictions = np.zeros(probability.shape, np.uint8)
    if probability.max() / 255.0 < label_threshold:
        return predictions
    mask = (probability / 255.0 >= threshold).astype(np.uint8)
    num_component, component = cv2.connectedComponents(mask, connectivity=8)
    for c in range(1, num_component):
        p = component == c
        if p.sum() >= min_component:
            predictions[p] = 1
    if predictions.sum() < min_area:
        predictions[:] = 0
    return predictions


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one pair as the public kernels computed it (1 when both are empty)."""
    if pred.sum() == 0 and truth.sum() == 0:
        return 1.0
    return 2.0 * (pred * truth).sum() / (pred.sum() + truth.sum())


def naive_search(
    probs: np.ndarray,
    truth: np.ndarray,
    axes: Sequence[dict[str, Sequence[float]]],
    defaults: Sequence[tuple[int, int, int, int]],
    tolerance: float = 1e-9,
) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """Every combination of every class's axes, every image post-processed and scored again for each.

    Ties (mean Dice within ``tolerance`` of the best) go to the cell nearest the defaults' cell (sum of index
    distances, then number of axes changed), then to the smaller component size, area, label threshold, threshold.

    Args:
        probs, truth: ``(N, C, H, W)`` uint8 probabilities (x 255) and {0, 1} truth.
        axes: per class ``{"threshold", "min_component", "label_threshold", "min_area"}`` value lists.
        defaults: per class the defaults' index on each axis.

    Returns:
        Per class the chosen values, and the ``(T, M, L, A)`` mean-Dice tables.
    """
    names = ("threshold", "min_component", "label_threshold", "min_area")
    choices, tables = [], []
    for c in range(probs.shape[1]):
        values = [list(axes[c][k]) for k in names]
        table = np.zeros([len(v) for v in values])
        for index in product(*[range(len(v)) for v in values]):
            setting = [v[i] for v, i in zip(values, index)]
            scores = [dice(naive_post_process(probs[i, c], *setting), truth[i, c]) for i in range(len(probs))]
            table[index] = np.mean(scores)
        best = table.max()
        ties = [tuple(i) for i in np.argwhere(table >= best - tolerance)]

        def order(index, default=defaults[c]):
            dist = [abs(i - d) for i, d in zip(index, default)]
            return (sum(dist), sum(d > 0 for d in dist), index[1], index[3], index[2], index[0])

        chosen = min(ties, key=order)
        choices.append({k: float(values[j][chosen[j]]) for j, k in enumerate(names)})
        tables.append(table)
    return choices, tables


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def load_masks(limit: int | None, rng: np.random.Generator) -> dict[str, Any]:
    """Real RLE strings per category, and the images (4-class RLEs, clean ones included) they come from.

    Returns:
        ``{"categories": {name: [rle, ...]}, "images": [{class_id: rle}, ...], "source": str}``.
    """
    from steelkit.csvio import read_rows

    categories: dict[str, list[str]] = {}
    images: list[dict[int, str]] = []
    train = SHARED / "train_real_partial.csv"
    predictions = SHARED / "public_test_predictions_khornlund.csv"
    listed = SHARED / "train_real_partial_images.txt"
    if train.is_file():
        frame, _, _ = read_rows(train)
        categories["real train masks"] = frame["EncodedPixels"].tolist()[:limit]
        by_image: dict[str, dict[int, str]] = {}
        for image_id, class_id, rle in zip(frame["ImageId"], frame["ClassId"], frame["EncodedPixels"]):
            by_image.setdefault(image_id, {})[int(class_id)] = rle
        ids = listed.read_text().split() if listed.is_file() else sorted(by_image)
        images = [by_image.get(i, {}) for i in ids]  # an id with no row is a clean image
        source = f"{train.name} ({len(frame)} real masks of {len(ids)} images)"
    else:
        from steelkit.synth import sample_labels

        print(f"speed: {train} is absent: using steelkit.synth masks instead of real ones", flush=True)
        from steelkit.rle import encode

        labels = sample_labels(300, rng, *SHAPE)
        images = [{c: encode(m) for c, m in masks.items()} for masks in labels]
        categories["synthetic masks"] = [r for image in images for r in image.values()][:limit]
        source = "steelkit.synth procedural masks (the real label files are absent)"
    if predictions.is_file():
        frame, _, _ = read_rows(predictions)
        categories["public test predictions"] = [r for r in frame["EncodedPixels"] if r][:limit]
        source += f"; {predictions.name} ({len(categories['public test predictions'])} predicted masks)"
    n_empty = min(200, limit or 200)
    categories["empty masks"] = [""] * n_empty
    return {"categories": categories, "images": images, "source": source}


def probability_maps(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Realistic ``(C, H, W)`` uint8 probabilities (x 255) of ``(C, H, W)`` {0, 1} masks.

    Each mask is blurred and scaled to a confidence of 0.7-0.95; every map gets smooth low-level noise (a few % of a
    map above 0.1) and finer noise correlated over a few pixels (no salt-and-pepper: network outputs are smooth), and a
    fifth of them a false-positive blob of peak 0.3-0.7.
    """
    n_classes, height, width = masks.shape
    out = np.empty(masks.shape, dtype=np.uint8)
    for c in range(n_classes):
        smooth = rng.standard_normal((max(height // 16, 2), max(width // 16, 2))).astype(np.float32)
        p = cv2.resize(smooth, (width, height), interpolation=cv2.INTER_CUBIC) * 0.04 + 0.02
        if masks[c].any():
            p += cv2.GaussianBlur(masks[c].astype(np.float32), (0, 0), 6.0) * rng.uniform(0.7, 0.95)
        if rng.random() < 0.2:
            blob = np.zeros((height, width), np.float32)
            centre = (int(rng.integers(width)), int(rng.integers(height)))
            axes = (int(rng.integers(8, width // 8 + 9)), int(rng.integers(4, height // 4 + 5)))
            cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
            p += cv2.GaussianBlur(blob, (0, 0), 5.0) * rng.uniform(0.3, 0.7)
        fine = rng.standard_normal((max(height // 4, 2), max(width // 4, 2))).astype(np.float32)
        p += cv2.resize(fine, (width, height), interpolation=cv2.INTER_LINEAR) * 0.02  # smooth, as CNN outputs are
        out[c] = np.clip(p * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def image_masks(image: dict[int, str], shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """``(4, H, W)`` uint8 masks of one image's ``{class_id: rle}``."""
    from steelkit.rle import decode

    masks = np.zeros((4,) + tuple(shape), dtype=np.uint8)
    for class_id, rle in image.items():
        masks[class_id - 1] = decode(rle, shape)
    return masks


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """``(fn(*args), seconds)``."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _bar(items, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, mininterval=2.0, leave=False)


def _summary(samples: Sequence[float]) -> dict[str, float]:
    """Median of per-repeat figures (each already a mean per item), in milliseconds, with min and max."""
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


class Failures:
    """Disagreements between a reference and steelkit, collected and raised at the end (or at once)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)
            print(f"speed: MISMATCH: {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def bench_rle(inputs: dict[str, Any], repeats: int, failures: Failures, progress: bool) -> dict[str, Any]:
    """Encode and decode every mask of every category with both implementations, interleaved, ``repeats`` times.

    Encode gets a bool mask that was just decoded (in cache, as the kernel's masks are right after post-processing);
    decode gets the string. The first pass also checks that both encoders give the original string and both decoders
    the same pixels.
    """
    from steelkit.rle import decode, encode

    rows = []
    for category, rles in inputs["categories"].items():
        times = {k: np.zeros(repeats) for k in ("ref_encode", "encode", "ref_decode", "decode")}
        for r in range(repeats + 1):  # pass 0 warms up and checks
            per = dict.fromkeys(times, 0.0)
            for rle in _bar(rles, len(rles), f"rle {category} {r}/{repeats}", progress):
                mask = decode(rle).astype(bool)
                ours, t_enc = timed(encode, mask)
                mask = decode(rle).astype(bool)
                theirs, t_ref_enc = timed(mask2rle, mask)
                decoded, t_dec = timed(decode, rle)
                ref_decoded, t_ref_dec = timed(rle2mask, rle)
                if r == 0:
                    failures.check(ours == rle, f"rle: steelkit encode differs from the input RLE ({category})")
                    failures.check(theirs == rle, f"rle: mask2rle differs from the input RLE ({category})")
                    failures.check(
                        np.array_equal(decoded, ref_decoded), f"rle: decode and rle2mask disagree ({category})"
                    )
                else:
                    per["encode"] += t_enc
                    per["ref_encode"] += t_ref_enc
                    per["decode"] += t_dec
                    per["ref_decode"] += t_ref_dec
            if r:
                for k in times:
                    times[k][r - 1] = per[k] / len(rles)
        runs = [len(rle.split()) // 2 for rle in rles]
        for op in ("encode", "decode"):
            ref, ours = _summary(times[f"ref_{op}"]), _summary(times[op])
            ratio = ref["median_ms"] / ours["median_ms"]
            rows.append(
                {
                    "operation": op,
                    "masks": category,
                    "n": len(rles),
                    "mean runs": float(np.mean(runs)),
                    "reference ms": ref["median_ms"],
                    "steelkit ms": ours["median_ms"],
                    "ratio": ratio,
                    "goal": f">= {GOALS['rle']:g}x",
                    "met": "yes" if ratio >= GOALS["rle"] else "NO",
                    "raw": {"reference": times[f"ref_{op}"].tolist(), "steelkit": times[op].tolist()},
                }
            )
            print(
                f"speed: rle {op:6s} {category:24s} reference {ref['median_ms']:.3f} ms, steelkit "
                f"{ours['median_ms']:.3f} ms per mask: {ratio:.1f}x",
                flush=True,
            )
    return {"rows": rows}


def bench_postprocess(
    images: Sequence[dict[int, str]], repeats: int, failures: Failures, rng: np.random.Generator, progress: bool
) -> dict[str, Any]:
    """Post-process every image's 4 probability maps with both implementations and check the masks are equal.

    The reference gets float32 probabilities (what the public kernels post-processed: sigmoid outputs), steelkit the
    uint8 maps the kernel caches; the float32 maps are the uint8 ones divided by 255, and 0.5 x 255 is not an integer,
    so both threshold the same pixels.
    """
    from steelkit.postprocess import PostProcess, apply_postprocess

    settings = PostProcess(
        pixel_threshold=(POST_THRESHOLD,) * 4,
        min_component=tuple(s + 1 for s in POST_MIN_SIZE),  # the reference keeps components of more than min_size
        min_area=POST_MIN_AREA,
    )
    groups: dict[str, list[np.ndarray]] = {"images with defects": [], "clean images": []}
    for image in images:
        group = "images with defects" if image else "clean images"
        groups[group].append(probability_maps(image_masks(image), rng))
    rows = []
    for group, maps in groups.items():
        if not maps:
            continue
        floats = [m.astype(np.float32) / np.float32(255.0) for m in maps]
        ref_times, our_times = np.zeros(repeats), np.zeros(repeats)
        kept = 0
        for r in range(repeats + 1):
            t_ref = t_ours = 0.0
            for u8, f32 in _bar(zip(maps, floats), len(maps), f"post-process {group} {r}/{repeats}", progress):
                ours, t = timed(apply_postprocess, u8, settings)
                t_ours += t
                start = time.perf_counter()
                theirs = [
                    post_process_area(f32[c], POST_THRESHOLD, POST_MIN_SIZE[c], POST_MIN_AREA[c]) for c in range(4)
                ]
                t_ref += time.perf_counter() - start
                if r == 0:
                    kept += int(ours.any(axis=(1, 2)).sum())
                    failures.check(
                        np.array_equal(ours, np.stack(theirs).astype(bool)),
                        f"post-processing: apply_postprocess and post_process disagree ({group})",
                    )
            if r:
                ref_times[r - 1], our_times[r - 1] = t_ref / len(maps), t_ours / len(maps)
        ref, ours = _summary(ref_times), _summary(our_times)
        components = [cv2.connectedComponents((m >= 128).astype(np.uint8))[0] - 1 for maps_ in maps[:50] for m in maps_]
        ratio = ref["median_ms"] / ours["median_ms"]
        rows.append(
            {
                "images": group,
                "n": len(maps),
                "components per map at 0.5": float(np.mean(components)),
                "masks kept": kept,
                "reference ms": ref["median_ms"],
                "steelkit ms": ours["median_ms"],
                "ratio": ratio,
                "raw": {"reference": ref_times.tolist(), "steelkit": our_times.tolist()},
            }
        )
        print(
            f"speed: post-process {group:20s} reference {ref['median_ms']:.2f} ms, steelkit {ours['median_ms']:.2f} ms "
            f"per image (4 classes): {ratio:.1f}x",
            flush=True,
        )
    return {
        "rows": rows,
        "settings": {"threshold": POST_THRESHOLD, "min_size": POST_MIN_SIZE, "min_area": POST_MIN_AREA},
    }


def search_inputs(
    images: Sequence[dict[int, str]], n: int, rng: np.random.Generator, shape: tuple[int, int] = SEARCH_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 4, h, w)`` uint8 probabilities and {0, 1} truth at the search scale, from the first ``n`` images."""
    from steelkit.images import resize_channels

    probs = np.zeros((n, 4) + tuple(shape), dtype=np.uint8)
    truth = np.zeros_like(probs)
    for i, image in enumerate(images[:n]):
        masks = image_masks(image)
        probs[i] = resize_channels(probability_maps(masks, rng), shape, cv2.INTER_AREA)
        truth[i] = resize_channels(masks, shape, cv2.INTER_NEAREST)
    return probs, truth


def bench_search(
    probs: np.ndarray, truth: np.ndarray, grid_name: str, repeats: int, failures: Failures
) -> dict[str, Any]:
    """``search_full`` (guard off, so both return the best cell) against :func:`naive_search` on the same grid."""
    from steelkit.kernel.pipeline import KERNEL_AREA_FRACTIONS
    from steelkit.search import SearchGrid, search_full

    grid = SearchGrid(area_fractions=KERNEL_AREA_FRACTIONS) if grid_name == "kernel" else SearchGrid(**SMALL_GRID)
    result = search_full(probs, truth, grid, guard=False)  # warm-up, and the axes (grid plus defaults)
    ours = []
    for _ in range(repeats):
        result, t = timed(search_full, probs, truth, grid, None, None, 1.0, False)
        ours.append(t)
    guarded = [timed(search_full, probs, truth, grid, None, None, 1.0, True, 10)[1] for _ in range(repeats)]
    axes = [r.axes for r in result.classes]
    defaults = [tuple(list(r.axes[k]).index(v) for k, v in zip(r.axes, (0.5, 0.0, 0.0, 0.0))) for r in result.classes]
    expected_axes = {
        "threshold": grid.thresholds,
        "min_component": grid.min_components,
        "label_threshold": grid.label_thresholds,
        "min_area": tuple(grid.areas(probs.shape[-2:])),
    }
    for r in result.classes:
        failures.check(
            {k: tuple(v) for k, v in r.axes.items()} == {k: tuple(map(float, v)) for k, v in expected_axes.items()},
            "search: search_full searched other axes than the grid",
        )
    print(f"speed: naive search over {probs.shape[0]} images, grid {grid_name} ...", flush=True)
    (choices, tables), t_naive = timed(naive_search, probs, truth, axes, defaults)
    same = True
    for c, (r, choice, table) in enumerate(zip(result.classes, choices, tables)):
        agree = r.searched == choice
        same &= agree
        failures.check(agree, f"search: class {c + 1}: search_full chose {r.searched}, the naive loop {choice}")
        failures.check(
            np.allclose(r.table, table, rtol=0, atol=1e-9),
            f"search: class {c + 1}: tables differ by up to {np.abs(r.table - table).max():.3g}",
        )
    cells = int(np.prod(tables[0].shape))
    median = float(np.median(ours))
    ratio = t_naive / median
    print(
        f"speed: search grid {grid_name} ({cells} cells x 4 classes, {probs.shape[0]} images at "
        f"{probs.shape[2]}x{probs.shape[3]}): naive {t_naive:.1f} s, search_full {median * 1e3:.1f} ms: {ratio:.0f}x; "
        f"same choices: {same}",
        flush=True,
    )
    return {
        "grid": grid_name,
        "cells per class": cells,
        "images": int(probs.shape[0]),
        "size": f"{probs.shape[2]}x{probs.shape[3]}",
        "naive s": t_naive,
        "steelkit ms": median * 1e3,
        "steelkit with guard ms": float(np.median(guarded)) * 1e3,
        "ratio": ratio,
        "same choices": "yes" if same else "NO",
        "goal": f">= {GOALS['search']:g}x",
        "met": "yes" if ratio >= GOALS["search"] and same else "NO",
        "choices": [r.searched for r in result.classes],
        "raw": {"steelkit": ours, "steelkit_guard": guarded},
    }


def _entry(name: str, scale: float) -> Any:
    """A manifest entry for a 4-class sigmoid segmenter with ImageNet normalisation at input ``scale``."""
    from steelkit.manifest import ModelEntry

    return ModelEntry(
        name=name,
        file=f"{name}.pt",
        sha256="0" * 64,
        size=1,
        kind="segmenter",
        format="torchscript",
        architecture="unet",
        encoder=name,
        fold=0,
        folds=1,
        classes=[1, 2, 3, 4],
        activation="sigmoid4",
        input={"mean": list(MEAN), "std": list(STD), "scale": scale},
        train_size=list(SHAPE),
        val_metric={},
        thresholds={},
    )


@functools.lru_cache(maxsize=2)
def scripted_unet(encoder: str, decoder_channels: tuple[int, ...] | None, seed: int = 0):
    """A TorchScript smp Unet with random weights (``encoder_weights=None``: nothing is downloaded); built once per
    process for each architecture."""
    import torch

    from steelkit.config import ModelConfig
    from steelkit.models import build_segmenter

    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=encoder, decoder_channels=None if decoder_channels is None else tuple(decoder_channels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(build_segmenter(cfg).eval())


def bench_overhead(
    work: Path,
    image_ids: Sequence[str],
    images: Sequence[dict[int, str]],
    models: dict[str, tuple[str, Sequence[int] | None]],
    repeats: int,
    rng: np.random.Generator,
    progress: bool,
    warmup: int = 2,
) -> dict[str, Any]:
    """The kernel's per-image work besides the model, piece by piece, on one core, and the models' forward times.

    The ensemble's own work (normalisation, flips, sigmoid, merge) is timed with a model that returns stored logits,
    so that only the model's cost is left out. The pieces after it get realistic uint8 probabilities of real masks.
    """
    import torch

    from steelkit.csvio import read_sample_submission, write_submission
    from steelkit.images import resize_channels
    from steelkit.kernel.predict import Ensemble, LoadedModel, TestImages
    from steelkit.kernel.pseudo import confidence_stats
    from steelkit.postprocess import PostProcess, apply_postprocess
    from steelkit.rle import encode
    from steelkit.tensors import scaled_size, to_uint8

    class StoredLogits(torch.nn.Module):
        """Returns the same logits whatever the input: the ensemble's own work, without a model."""

        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits

    competition = work / "competition"
    dataset = TestImages(competition / "test_images", image_ids, SHAPE)
    sample = read_sample_submission(competition / "sample_submission.csv")
    first = probability_maps(image_masks(images[0]), rng).astype(np.float32) / 255.0
    logits = torch.logit(torch.from_numpy(first).clamp(1e-4, 1 - 1e-4))[None]
    null = torch.jit.script(StoredLogits(logits))
    ensembles = {
        scale: Ensemble([LoadedModel(_entry("stored", scale), null)], "h", torch.device("cpu"), fp16=False)
        for scale in (1.0, 0.25)
    }
    post = PostProcess(pixel_threshold=(0.5,) * 4, min_area=POST_MIN_AREA, min_component=(64,) * 4)
    store = scaled_size(SHAPE, 0.5)  # the kernel caches test probabilities at half resolution
    maps = [probability_maps(image_masks(images[i % len(images)]), rng) for i in range(len(image_ids))]
    cache = np.zeros((len(image_ids), 4) + store, dtype=np.uint8)
    pieces = [
        "JPEG decode (TestImages item)",
        "ensemble without the model, input scale 1.0 (normalise, 2 flip views, sigmoid, merge)",
        "to uint8 (predict_stream)",
        "cache at half resolution (INTER_AREA)",
        "confidence statistics",
        "post-processing (threshold, components >= 64, min area)",
        "RLE encode (non-empty classes)",
        "CSV: validate + write the submission (per image)",
    ]
    extra = "ensemble without the model, input scale 0.25 (area down, bilinear up)"
    times = {p: np.zeros(repeats) for p in pieces + [extra]}
    for r in range(repeats + 1):
        per = dict.fromkeys(times, 0.0)
        predictions: dict[tuple[str, int], str] = {}
        for i in _bar(range(len(image_ids)), len(image_ids), f"overhead {r}/{repeats}", progress):
            (_, image, message), t = timed(dataset.__getitem__, i)
            assert not message, message
            per[pieces[0]] += t
            (probs, _), t = timed(ensembles[1.0], image[None])
            per[pieces[1]] += t
            per[extra] += timed(ensembles[0.25], image[None])[1]
            _, t = timed(lambda p: to_uint8(p).cpu().numpy(), probs)
            per[pieces[2]] += t
            u8 = maps[i]
            start = time.perf_counter()
            cache[i] = resize_channels(u8, store, cv2.INTER_AREA)
            per[pieces[3]] += time.perf_counter() - start
            per[pieces[4]] += timed(confidence_stats, u8, 0.2, 0.8)[1]
            masks, t = timed(apply_postprocess, u8, post, 1.0, None)
            per[pieces[5]] += t
            start = time.perf_counter()
            for c in range(4):
                if masks[c].any():
                    predictions[(image_ids[i], c + 1)] = encode(masks[c])
            per[pieces[6]] += time.perf_counter() - start
        per[pieces[7]] += timed(write_submission, sample, predictions, work / "submission.csv", SHAPE)[1]
        if r:
            for k in times:
                times[k][r - 1] = per[k] / len(image_ids)
    rows = [{"piece": p, **_summary(times[p])} for p in pieces]
    total = float(sum(row["median_ms"] for row in rows))
    rows.append({"piece": "total per image", "median_ms": total})
    rows.append({"piece": extra + " (instead of the 1.0 row)", **_summary(times[extra])})
    for row in rows:
        print(f"speed: overhead {row['piece']}: {row['median_ms']:.2f} ms per image", flush=True)

    forward = []
    x = torch.randn(1, 3, *SHAPE)
    for name, (encoder, decoder) in models.items():
        module, t_script = timed(scripted_unet, encoder, None if decoder is None else tuple(decoder))
        samples = []
        with torch.no_grad():
            for _ in range(warmup):  # TorchScript profiles the first runs, then optimises
                module(x)
            for _ in range(repeats):
                samples.append(timed(module, x)[1])
        per_view = float(np.median(samples)) * 1e3
        views = 2  # the kernel's default TTA: identity and horizontal flip
        forward.append(
            {
                "model": name,
                "encoder": encoder,
                "forward ms per view": per_view,
                "views (TTA h)": views,
                "model ms per image": per_view * views,
                "overhead ms per image": total,
                "overhead % of model": 100.0 * total / (per_view * views),
                "raw": samples,
                "script s": t_script,
            }
        )
        print(
            f"speed: forward {name} ({encoder}) {per_view:.0f} ms per view at {SHAPE[0]}x{SHAPE[1]}, one core; "
            f"non-model work {total:.1f} ms per image = {100.0 * total / (per_view * views):.1f}% of 2 views",
            flush=True,
        )
    return {
        "pieces": rows,
        "total_ms": total,
        "goal": f"<= {GOALS['overhead_ms']:g} ms",
        "met": total <= GOALS["overhead_ms"],
        "forward": forward,
        "images": len(image_ids),
        "raw": {k: v.tolist() for k, v in times.items()},
    }


def memory_child(
    folder: Path, n: int, scale: float, encoder: str, decoder: Sequence[int] | None, workers: int = 2
) -> dict[str, Any]:
    """Run in a subprocess: predict ``n`` test images as the kernel's predict stage does, return the peak RSS.

    Ensemble of the tiny model with the kernel's default flip TTA, ``predict_stream`` (batches of 8, 2 JPEG workers),
    the uint8 cache at half resolution as the kernel keeps it (a memory-mapped ``.npy`` file), confidence statistics,
    post-processing, RLE and the submission CSV.
    """
    import torch

    from steelkit.csvio import read_sample_submission, write_submission
    from steelkit.images import resize_channels
    from steelkit.kernel.predict import Ensemble, LoadedModel, predict_stream
    from steelkit.kernel.pseudo import confidence_stats
    from steelkit.postprocess import PostProcess, apply_postprocess
    from steelkit.rle import encode
    from steelkit.tensors import scaled_size

    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    competition = folder / "competition"
    sample = read_sample_submission(competition / "sample_submission.csv")
    image_ids = sample.image_ids[:n]
    module = scripted_unet(encoder, None if decoder is None else tuple(decoder))
    ensemble = Ensemble([LoadedModel(_entry("tiny", scale), module)], "h", torch.device("cpu"), fp16=False)
    post = PostProcess(pixel_threshold=(0.5,) * 4, min_area=POST_MIN_AREA)
    store = scaled_size(SHAPE, 0.5)
    cache = np.lib.format.open_memmap(folder / "cache.npy", mode="w+", dtype=np.uint8, shape=(n, 4) + store)
    before = rss_mib()
    start = time.perf_counter()
    predictions: dict[tuple[str, int], str] = {}
    stream = predict_stream(ensemble, competition / "test_images", image_ids, SHAPE, 8, workers)
    for indices, probs, _labels, errors in stream:
        for index, image_probs, error in zip(indices, probs, errors):
            if error:
                raise RuntimeError(error)
            cache[index] = resize_channels(image_probs, store, cv2.INTER_AREA)
            confidence_stats(image_probs, 0.2, 0.8)
            masks = apply_postprocess(image_probs, post, 1.0, None)
            for c in range(4):
                if masks[c].any():
                    predictions[(image_ids[index], c + 1)] = encode(masks[c])
    cache.flush()
    write_submission(sample, predictions, folder / "submission.csv", SHAPE)
    seconds = time.perf_counter() - start
    return {
        "images": n,
        "input_scale": scale,
        "encoder": encoder,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "rss_before_mib": before,
        "rss_after_mib": rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cache_bytes": int(cache.nbytes),
        "float32_bytes": n * 4 * SHAPE[0] * SHAPE[1] * 4,
        "masks_written": len(predictions),
        "torch_threads": torch.get_num_threads(),
        "jpeg_workers": workers,
    }


def bench_memory(
    work: Path, n: int, scale: float, encoder: str, decoder: Sequence[int] | None, workers: int = 2
) -> dict[str, Any]:
    """:func:`memory_child` in a fresh Python process (so that its peak RSS is its own)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        str(work),
        "--memory-images",
        str(n),
        "--memory-scale",
        str(scale),
        "--tiny-encoder",
        encoder,
        "--memory-workers",
        str(workers),
        "--tiny-decoder",
        *(["none"] if decoder is None else [str(d) for d in decoder]),
    ]
    print(f"speed: predicting {n} images in a subprocess for its peak memory ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("MEMORY "))
    result = json.loads(line[len("MEMORY ") :])
    result["subprocess_s"] = time.perf_counter() - start
    print(
        f"speed: memory: {n} images in {result['seconds']:.0f} s; peak RSS {result['peak_rss_mib']:.0f} MiB (workers "
        f"{result['peak_rss_workers_mib']:.0f} MiB); uint8 cache {result['cache_bytes'] / 2**20:.0f} MiB vs float32 "
        f"{result['float32_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _fmt_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "raw"} for row in rows]


def report(results: dict[str, Any], args: argparse.Namespace, out: Path, info: dict[str, Any]) -> None:
    sections = []
    goals = []
    notes = [
        f"Inputs: {results.get('inputs', '')}.",
        f"Every figure is the median over {args.repeats} repeats (after a warm-up pass) of the mean time per item; "
        "`ratio` = reference / steelkit. Load from other processes on the machine during the run: "
        f"{results.get('load', '')}.",
    ]
    if "rle" in results:
        rows = _fmt_rows(results["rle"]["rows"])
        cols = ["operation", "masks", "n", "mean runs", "reference ms", "steelkit ms", "ratio", "goal", "met"]
        body = markdown_table(rows, cols, ".3f")
        body += (
            "\n\nReference: `mask2rle` / `rle2mask` of the public kernels (Fortran-order flatten, pad, `np.where` of "
            "changes, `' '.join(str(x) ...)`; split, `np.asarray`, a Python loop `img[lo:hi] = 1`, reshape (W, H) and "
            "transpose). Encode gets a bool mask just decoded (in cache, as the kernel's masks are right after "
            "post-processing); decode returns a C-contiguous array (steelkit) or a transposed view (reference). Both "
            "encoders give back the input string and both decoders the same pixels, checked on every mask."
        )
        sections.append(("RLE: steelkit.rle against the public kernels' mask2rle / rle2mask", body))
        for op in ("encode", "decode"):
            real = [r for r in rows if r["operation"] == op and r["masks"] != "empty masks"]
            worst = min(r["ratio"] for r in real)
            goals.append(
                {
                    "goal": f"RLE {op} >= {GOALS['rle']:g}x the reference (real masks)",
                    "figure": f"{worst:.1f}x (worst category)",
                    "met": "yes" if worst >= GOALS["rle"] else "NO",
                }
            )
    if "postprocess" in results:
        rows = _fmt_rows(results["postprocess"]["rows"])
        cols = ["images", "n", "components per map at 0.5", "masks kept", "reference ms", "steelkit ms", "ratio"]
        body = markdown_table(rows, cols, ".2f")
        body += (
            f"\n\nPer image (4 classes), threshold {POST_THRESHOLD}, components of more than {list(POST_MIN_SIZE)} "
            f"pixels, whole-mask minimum area {list(POST_MIN_AREA)}. Reference: `post_process` of the public kernel "
            "(`cv2.threshold`, `cv2.connectedComponents`, then `component == c` and `p.sum()` per component) on "
            "float32 maps, plus the minimum area; steelkit: `apply_postprocess` on the uint8 maps the kernel caches "
            "(OpenCV threshold, components labelled inside the mask's bounding box and measured with a `bincount`). "
            "Identical masks, checked on every image."
        )
        sections.append(("Post-processing: apply_postprocess against the per-component loop", body))
    if "search" in results:
        rows = _fmt_rows(results["search"])
        cols = [
            "grid",
            "cells per class",
            "images",
            "size",
            "naive s",
            "steelkit ms",
            "steelkit with guard ms",
            "ratio",
            "same choices",
            "goal",
            "met",
        ]
        body = markdown_table(rows, cols, ".1f")
        body += (
            "\n\n`search_full` (guard off, so it returns the best cell) against a naive loop: for every class and "
            "every cell (pixel threshold x component minimum size x label gate x minimum area), post-process every "
            "image with the per-component loop and score it with a Dice loop; ties broken as `best_cell` does "
            "(nearest the defaults, then coarsest). Both choose the same values and every cell's mean Dice agrees to "
            "1e-9. `kernel` is the grid the kernel searches (`SearchGrid(area_fractions=KERNEL_AREA_FRACTIONS)`), "
            f"`small` is {SMALL_GRID}. `steelkit with guard` is the kernel's call (split-half guard, 10 repeats)."
        )
        for row in rows:
            body += f"\n\nChoices on grid `{row['grid']}`: " + "; ".join(
                f"class {c + 1}: {choice}" for c, choice in enumerate(row["choices"])
            )
        sections.append(("Search: search_full against a naive nested loop", body))
        kernel = [r for r in rows if r["grid"] == "kernel"] or rows
        goals.append(
            {
                "goal": f"search >= {GOALS['search']:g}x with identical choices (grid {kernel[0]['grid']})",
                "figure": f"{kernel[0]['ratio']:.0f}x, same choices: {kernel[0]['same choices']}",
                "met": kernel[0]["met"],
            }
        )
    if "overhead" in results:
        o = results["overhead"]
        pieces = [{"piece": r["piece"], "ms per image": r["median_ms"]} for r in o["pieces"]]
        body = markdown_table(pieces, ["piece", "ms per image"], ".2f")
        body += "\n\n" + markdown_table(
            _fmt_rows(o["forward"]),
            [
                "model",
                "encoder",
                "forward ms per view",
                "views (TTA h)",
                "model ms per image",
                "overhead ms per image",
                "overhead % of model",
            ],
            ".1f",
        )
        body += (
            f"\n\nOne core (`torch.set_num_threads(1)`, `cv2.setNumThreads(1)`), {o['images']} synthetic test JPEGs "
            "(256x1600), batch 1. The ensemble rows run the kernel's `Ensemble` with a model that returns stored "
            "logits, so they hold everything the ensemble does except the model; the later pieces get realistic uint8 "
            "probabilities of real masks. `total` adds the rows above it (input scale 1.0, as the forward times). "
            "Forward: TorchScript smp Unets with random weights, 256x1600, batch 1, `torch.no_grad`."
        )
        sections.append(("Kernel work per image besides the model, against the model's forward time", body))
        goals.append(
            {
                "goal": f"non-model work <= {GOALS['overhead_ms']:g} ms per image on one core",
                "figure": f"{o['total_ms']:.1f} ms",
                "met": "yes" if o["met"] else "NO",
            }
        )
    if "memory" in results:
        m = results["memory"]
        rows = [
            {"what": "images predicted", "value": f"{m['images']} (256x1600 JPEGs)"},
            {"what": "model", "value": f"Unet {m['encoder']}, input scale {m['input_scale']}, TTA h, 2 JPEG workers"},
            {"what": "time", "value": f"{m['seconds']:.0f} s ({m['images_per_s']:.1f} images/s)"},
            {"what": "RSS before predicting", "value": f"{m['rss_before_mib']:.0f} MiB"},
            {"what": "RSS after predicting", "value": f"{m['rss_after_mib']:.0f} MiB"},
            {"what": "peak RSS (the predicting process)", "value": f"{m['peak_rss_mib']:.0f} MiB"},
            {"what": "peak RSS of a JPEG worker", "value": f"{m['peak_rss_workers_mib']:.0f} MiB"},
            {"what": "uint8 cache (half resolution, memory-mapped)", "value": f"{m['cache_bytes'] / 2**20:.0f} MiB"},
            {
                "what": "float32 probabilities of every image at full size",
                "value": f"{m['float32_bytes'] / 2**20:.0f} MiB",
            },
        ]
        body = markdown_table(rows, ["what", "value"])
        body += (
            "\n\nA fresh Python process runs the kernel's predict path (`Ensemble`, `predict_stream` with batches of "
            "8, the uint8 cache as a memory-mapped `.npy` at half resolution, confidence statistics, post-processing, "
            "RLE, the submission CSV); peak RSS is `resource.getrusage(...).ru_maxrss`. The cache pages it wrote are "
            "counted in its RSS while they stay in the page cache."
        )
        sections.append(("Peak memory of predicting the test set", body))
    sections.insert(0, ("Goals", markdown_table(goals, ["goal", "figure", "met"])))
    sections.append(("Notes", "\n".join(f"- {n}" for n in notes)))
    write_results("speed", "Speed against reference implementations", sections, results, out, info)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section in seconds")
    parser.add_argument("--sections", nargs="+", default=["rle", "postprocess", "search", "overhead", "memory"])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of every measurement")
    parser.add_argument("--rle-masks", type=int, default=None, help="masks per RLE category (default all)")
    parser.add_argument("--post-images", type=int, default=300, help="images for the post-processing comparison")
    parser.add_argument("--search-images", type=int, default=16, help="images for the kernel-grid search")
    parser.add_argument("--small-search-images", type=int, default=100, help="images for the small-grid search")
    parser.add_argument("--search-grids", nargs="+", default=["kernel", "small"], choices=["kernel", "small"])
    parser.add_argument("--overhead-images", type=int, default=100, help="test JPEGs for the per-image work")
    parser.add_argument("--models", nargs="+", default=["tiny", "efficientnet-b3"], help="tiny, efficientnet-b3")
    parser.add_argument("--memory-images", type=int, default=1000, help="test images predicted for the peak memory")
    parser.add_argument("--memory-scale", type=float, default=0.25, help="the tiny model's input scale (cpu-tiny)")
    parser.add_argument("--memory-workers", type=int, default=2, help="JPEG DataLoader workers (the kernel's 2)")
    parser.add_argument("--tiny-encoder", default=TINY["encoder"])
    parser.add_argument("--tiny-decoder", nargs="+", default=[str(c) for c in TINY["decoder_channels"]])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.warmup = 2
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.rle_masks = min(args.rle_masks or 20, 20)
        args.post_images = min(args.post_images, 6)
        args.search_images = min(args.search_images, 4)
        args.small_search_images = min(args.small_search_images, 6)
        args.overhead_images = min(args.overhead_images, 3)
        args.memory_images = min(args.memory_images, 8)
        args.models = ["tiny"]
        args.search_grids = ["small"]  # the naive loop over the kernel's grid takes seconds per image
        args.memory_workers = 0
        args.warmup = 1
        if args.tiny_encoder == TINY["encoder"]:
            args.tiny_encoder, args.tiny_decoder = "tu-test_resnet", ["16", "16", "8", "8", "8"]
    unknown = set(args.sections) - {"rle", "postprocess", "search", "overhead", "memory"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.decoder = None if args.tiny_decoder == ["none"] else [int(c) for c in args.tiny_decoder]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        child = (args.memory_images, args.memory_scale, args.tiny_encoder, args.decoder, args.memory_workers)
        result = memory_child(args.memory_child, *child)
        print("MEMORY " + json.dumps(result), flush=True)
        return 0
    import torch

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    info = machine_info()
    start = time.perf_counter()
    load = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    progress = not args.no_progress and sys.stderr.isatty()
    failures = Failures()
    work = Path(tempfile.mkdtemp(prefix="steelkit-speed-"))
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "goals": GOALS}
    seconds: dict[str, float] = {}
    results["section_seconds"] = seconds
    try:
        clock = time.perf_counter()
        inputs = load_masks(args.rle_masks, rng)
        results["inputs"] = inputs["source"]
        images = inputs["images"]
        seconds["inputs"], clock = time.perf_counter() - clock, time.perf_counter()
        if "rle" in args.sections:
            results["rle"] = bench_rle(inputs, args.repeats, failures, progress)
            seconds["rle"], clock = time.perf_counter() - clock, time.perf_counter()
        if "postprocess" in args.sections:
            chosen = [images[i] for i in np.sort(rng.permutation(len(images))[: args.post_images])]
            results["postprocess"] = bench_postprocess(chosen, args.repeats, failures, rng, progress)
            seconds["postprocess"], clock = time.perf_counter() - clock, time.perf_counter()
        if "search" in args.sections:
            results["search"] = []
            sizes = {"kernel": args.search_images, "small": args.small_search_images}
            for grid, n in ((g, sizes[g]) for g in args.search_grids):
                probs, truth = search_inputs(images, n, rng)
                results["search"].append(bench_search(probs, truth, grid, args.repeats, failures))
            seconds["search"], clock = time.perf_counter() - clock, time.perf_counter()
        if "overhead" in args.sections or "memory" in args.sections:
            from steelkit.synth import synthesize

            n = max(args.overhead_images if "overhead" in args.sections else 0, args.memory_images)
            print(f"speed: writing {n} synthetic test JPEGs ...", flush=True)
            synthesize(work / "competition", 0, n, args.seed, progress=progress)
            seconds["jpegs"], clock = time.perf_counter() - clock, time.perf_counter()
        if "overhead" in args.sections:
            from steelkit.csvio import read_sample_submission

            ids = read_sample_submission(work / "competition" / "sample_submission.csv").image_ids
            models = {"tiny": (args.tiny_encoder, args.decoder), "efficientnet-b3": ("efficientnet-b3", None)}
            chosen_models = {k: models[k] for k in args.models}
            results["overhead"] = bench_overhead(
                work, ids[: args.overhead_images], images, chosen_models, args.repeats, rng, progress, args.warmup
            )
            seconds["overhead"], clock = time.perf_counter() - clock, time.perf_counter()
        if "memory" in args.sections:
            torch.set_num_threads(threads)
            results["memory"] = bench_memory(
                work, args.memory_images, args.memory_scale, args.tiny_encoder, args.decoder, args.memory_workers
            )
            seconds["memory"] = time.perf_counter() - clock
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
        shutil.rmtree(work, ignore_errors=True)
    end_load = os.getloadavg()
    results["load"] = (
        f"1-minute load average {load[0]:.2f} at the start and {end_load[0]:.2f} at the end "
        f"on {info.get('cpu_cores_available')} cores"
    )
    results["seconds"] = time.perf_counter() - start
    results["mismatches"] = failures.messages
    report(results, args, args.out, info)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"speed: done in {results['seconds']:.0f} s ({parts})", flush=True)
    if failures.messages:
        print("speed: FAILED: references and steelkit disagree:\n  " + "\n  ".join(failures.messages), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
