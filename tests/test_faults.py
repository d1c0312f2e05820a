"""Bad input and faults: every case ends in a clear message and, on the kernel side, a valid submission.

Kernel cases run ``kernels/inference.py`` as a subprocess with networking disabled, exactly as on Kaggle (the wheel
is installed offline from the dataset folder). Each kernel case checks three things: the process ends normally, the
submission answers the sample submission (or, where nothing can be written, no ``submission.csv`` is left at all),
and the problem is named in the log and in ``kernel_report.json``.

| case | test |
|---|---|
| 1-4 corrupt / truncated / missing / wrong-size / 1- and 4-channel images | test_case_01_04_* |
| 5 empty test folder; sample submission without rows | test_case_05_* |
| 6-8 missing, truncated, tampered, unloadable and NaN models | test_case_06_08_* |
| 9 every model failing | test_case_09_* |
| 10 out of memory | test_case_10_* |
| 11 time limit in the middle of each stage | test_case_11_* |
| 12 working folder not writable or full | test_case_12_* |
| 13 manifest with an unknown schema version or missing fields | test_case_13_* |
| 14 competition folder not found | test_case_14_* |
| 15-16 malformed RLE, duplicate rows, unknown class ids in train.csv | test_case_15_*, test_case_16_* |
| 17 images named by train.csv but missing | test_case_17_* |
| 18 training killed during an epoch | test_case_18_* |
| 19 build_dataset.py with bad inputs | test_case_19_* |
| 20 unknown architecture, encoder, loss, preset | test_case_20_* |
| fuzz: RLE strings and CSV rows | test_fuzz_* |
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from steelkit.csvio import read_labels, read_sample_submission, read_submission
from steelkit.demo import run_kernel_subprocess, simulate_kaggle_input
from tests.conftest import SHAPE

#: every kernel run here: CPU, no decoding workers (fast start), few fine-tuning steps
KERNEL_ARGS = ["--device", "cpu", "--num-workers", "0", "--pseudo-steps", "4", "--quiet"]
#: where two runs' submissions are compared: the fold ensemble alone, with the manifest's post-processing
COMPARE_ARGS = KERNEL_ARGS + ["--stages"]


# ------------------------------------------------------------------------------------------------------ helpers
def kernel(built, name: str, args=(), competition: Path | None = None, dataset: Path | None = None, **kwargs):
    """Run the kernel offline on (copies of) the built competition and dataset; return (result, report, working)."""
    root = built["root"] / "faults" / name
    input_root = simulate_kaggle_input(root, competition or built["competition"], dataset or built["dist"])
    working = kwargs.pop("working", root / "working")
    result = run_kernel_subprocess(input_root, working, list(args), timeout=600, **kwargs)
    report_path = Path(working) / "kernel_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return result, report, Path(working)


def valid_submission(built, working: Path, competition: Path | None = None) -> pd.DataFrame:
    """The submission read back and checked against the sample submission (raises when it does not answer it)."""
    sample = read_sample_submission((competition or built["competition"]) / "sample_submission.csv")
    return read_submission(working / "submission.csv", sample, SHAPE)


def copy_competition(built, name: str) -> Path:
    out = built["root"] / "faults" / name / "competition"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(built["competition"], out)
    return out


def copy_dataset(built, name: str, source: Path | None = None) -> Path:
    out = built["root"] / "faults" / name / "dist" / "steelkit-weights"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source or built["dist"], out)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def add_model(dataset: Path, name: str, data: bytes | None, like: str = "tiny-fold0", pin: bool = True) -> None:
    """Add a manifest entry ``name`` (a copy of ``like``'s) whose file holds ``data`` (``None``: no file). With
    ``pin`` the entry records the file's real sha256 and size, so it passes verification."""
    path = dataset / "weights_manifest.json"
    manifest = json.loads(path.read_text())
    entry = dict(next(m for m in manifest["models"] if m["name"] == like))
    entry.update(name=name, file=f"{name}.pt")
    if data is not None:
        (dataset / entry["file"]).write_bytes(data)
        if pin:
            entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    manifest["models"].append(entry)
    path.write_text(json.dumps(manifest, indent=2))


def nan_model_bytes(tmp: Path) -> bytes:
    """A real TorchScript segmenter whose every output is NaN."""

    class NaNSegmenter(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 4, x.shape[2], x.shape[3]), float("nan"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(NaNSegmenter())
        torch.jit.save(scripted, str(tmp))
    return tmp.read_bytes()


def newer_torch_bytes(path: Path) -> bytes:
    """``path``'s TorchScript archive with its format version raised to 99, as a far newer torch would save it."""
    out = path.with_suffix(".v99")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, b"99\n" if info.filename.endswith("/version") else data)
    data = out.read_bytes()
    out.unlink()
    return data


def problems_text(report) -> str:
    return "\n".join(report["problems"] + report.get("image_problems", []))


@pytest.fixture(scope="module")
def compare_dist(built):
    """The shipped dataset with post-processing that keeps every pixel above 0.5: the tiny models then predict many
    masks, so comparing two runs' submissions compares real predictions, not two empty files."""
    dataset = copy_dataset(built, "compare")
    path = dataset / "weights_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["postprocess"].update(pixel_threshold=[0.5] * 4, min_area=[0] * 4, min_component=[0] * 4)
    path.write_text(json.dumps(manifest, indent=2))
    return dataset


@pytest.fixture(scope="module")
def baseline(built, compare_dist):
    """The reference: the shipped models on the untouched competition, the fold ensemble alone."""
    result, report, working = kernel(built, "baseline", COMPARE_ARGS, dataset=compare_dist)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["problems"] == [], report["problems"]
    frame = valid_submission(built, working)
    assert (frame["EncodedPixels"] != "").sum() >= 4, "the comparison needs predicted masks"
    return frame, report


# ------------------------------------------------------------------------------------------------------ 1-4
@pytest.fixture(scope="module")
def bad_images(built, compare_dist):
    """The test set plus: a corrupt and a truncated JPEG, one listed image missing, a half-size, a rotated, a
    1-channel and a 4-channel (CMYK) image."""
    from PIL import Image

    competition = copy_competition(built, "bad_images")
    test = competition / "test_images"
    sources = sorted(p.name for p in test.glob("*.jpg"))
    grey = cv2.imread(str(test / sources[0]), cv2.IMREAD_GRAYSCALE)
    h, w = grey.shape
    jpeg = (test / sources[1]).read_bytes()
    files = {
        "corrupt.jpg": b"this is not a JPEG" * 20,
        "truncated.jpg": jpeg[: len(jpeg) - 300],
    }
    for name, data in files.items():
        (test / name).write_bytes(data)
    half = cv2.resize(grey, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(test / "half.jpg"), cv2.merge([half] * 3))
    cv2.imwrite(str(test / "rotated.jpg"), cv2.merge([np.ascontiguousarray(np.rot90(grey))] * 3))
    cv2.imwrite(str(test / "one_channel.jpg"), grey)
    Image.fromarray(grey).convert("CMYK").save(test / "four_channel.jpg")
    assert Image.open(test / "four_channel.jpg").mode == "CMYK"
    extra = ["corrupt.jpg", "truncated.jpg", "missing.jpg", "half.jpg", "rotated.jpg", "one_channel.jpg"]
    extra.append("four_channel.jpg")
    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str, keep_default_na=False)
    rows = [{"ImageId": i, "EncodedPixels": "1 1", "ClassId": str(c)} for i in extra for c in range(1, 5)]
    pd.concat([sample, pd.DataFrame(rows)[sample.columns]]).to_csv(competition / "sample_submission.csv", index=False)
    result, report, working = kernel(built, "bad_images", COMPARE_ARGS, competition=competition, dataset=compare_dist)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"competition": competition, "result": result, "report": report, "working": working, "sources": sources}


def test_case_01_04_every_bad_image_is_named_and_the_submission_is_valid(built, bad_images):
    report = bad_images["report"]
    frame = valid_submission(built, bad_images["working"], bad_images["competition"])
    assert len(frame) == 4 * (6 + 7)
    text = problems_text(report)
    for name, reason in [
        ("corrupt.jpg", "unreadable or corrupt"),
        ("truncated.jpg", ""),  # refused by OpenCV or by the end-of-image check (test_case_01_a_truncated_...)
        ("missing.jpg", "image missing"),
        ("rotated.jpg", "another aspect ratio"),
    ]:
        line = next(p for p in report["image_problems"] if name in p)
        assert reason in line and line.endswith("predicted empty"), line
        assert (frame.loc[frame["ImageId"] == name, "EncodedPixels"] == "").all()
    assert "predicted after resizing" in next(p for p in report["image_problems"] if "half.jpg" in p)
    assert "one_channel.jpg" not in text and "four_channel.jpg" not in text
    assert report["counts"]["predicted"] == 13
    assert report["counts"]["unreadable"] == 4
    assert "could not be read: predicted empty" in "\n".join(report["problems"])
    assert "IMAGE: " in bad_images["result"].stdout  # named in the log too


def test_case_01_04_good_images_are_predicted_as_without_the_bad_ones(bad_images, baseline):
    frame = read_submission(
        bad_images["working"] / "submission.csv",
        read_sample_submission(bad_images["competition"] / "sample_submission.csv"),
        SHAPE,
    )
    reference, _ = baseline
    keep = frame["ImageId"].isin(set(reference["ImageId"]))
    assert frame.loc[keep, "EncodedPixels"].tolist() == reference["EncodedPixels"].tolist()


@pytest.mark.parametrize("keep", [0.33, 0.9, 0.999])
def test_case_01_a_truncated_jpeg_is_refused_wherever_it_is_cut(built, tmp_path, keep):
    from steelkit.images import read_grey

    jpeg = next((built["competition"] / "test_images").glob("*.jpg")).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: int(len(jpeg) * keep)])
    with pytest.raises(ValueError, match=r"cut.jpg: (image unreadable or corrupt|truncated JPEG)"):
        read_grey(tmp_path / "cut.jpg")


def test_case_03_04_grey_channels_and_sizes_read_as_the_kernel_reads_them(built, tmp_path):
    from PIL import Image

    from steelkit.kernel.predict import read_fitted

    test = built["competition"] / "test_images"
    grey = cv2.imread(str(next(test.glob("*.jpg"))), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "one.png"), grey)
    Image.fromarray(grey).convert("CMYK").save(tmp_path / "cmyk.jpg")
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.merge([grey, grey, grey, np.full_like(grey, 255)]))
    assert np.array_equal(read_fitted(tmp_path / "one.png", SHAPE)[0], grey)
    assert np.array_equal(read_fitted(tmp_path / "rgba.png", SHAPE)[0], grey)
    assert np.abs(read_fitted(tmp_path / "cmyk.jpg", SHAPE)[0].astype(int) - grey).mean() < 3  # lossy JPEG
    cv2.imwrite(str(tmp_path / "big.png"), cv2.resize(grey, (SHAPE[1] * 2, SHAPE[0] * 2)))
    image, note = read_fitted(tmp_path / "big.png", SHAPE)
    assert image.shape == SHAPE and "768x128 (WxH), expected 384x64" in note
    cv2.imwrite(str(tmp_path / "rot.png"), np.ascontiguousarray(grey.T))
    with pytest.raises(ValueError, match="rot.png: image is 64x384 .* another aspect ratio"):
        read_fitted(tmp_path / "rot.png", SHAPE)


# ------------------------------------------------------------------------------------------------------ 5
def test_case_05_an_empty_test_folder_leaves_the_all_empty_submission(built):
    competition = copy_competition(built, "empty_folder")
    for image in (competition / "test_images").iterdir():
        image.unlink()
    result, report, working = kernel(built, "empty_folder", KERNEL_ARGS, competition=competition)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = valid_submission(built, working, competition)
    assert len(frame) == 24 and (frame["EncodedPixels"] == "").all()
    text = "\n".join(report["problems"])
    assert "holds no .jpg images" in text and "6 of 6 test images could not be read" in text
    assert "the all-empty submission stands" in text and report["outcome"] == "all-empty written"


def test_case_05_a_sample_submission_without_rows_gives_a_header_only_submission(built):
    competition = copy_competition(built, "no_rows")
    header = (competition / "sample_submission.csv").read_text().splitlines()[0]
    (competition / "sample_submission.csv").write_text(header + "\n")
    result, report, working = kernel(built, "no_rows", KERNEL_ARGS, competition=competition)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (working / "submission.csv").read_text().splitlines() == [header]
    assert any("lists no images: nothing to predict" in p for p in report["problems"])
    assert report["models"] == []  # nothing was loaded for nothing to predict


# ------------------------------------------------------------------------------------------------------ 6-8
def test_case_06_08_bad_weight_files_are_refused_and_the_good_models_submit_alone(
    built, compare_dist, baseline, tmp_path
):
    dataset = copy_dataset(built, "bad_models", compare_dist)
    good = (dataset / "tiny-fold0.pt").read_bytes()
    add_model(dataset, "missing", None)  # 6: in the manifest, not on disk
    add_model(dataset, "truncated", good, pin=True)  # 6: pinned whole, then cut
    (dataset / "truncated.pt").write_bytes(good[: len(good) // 2])
    add_model(dataset, "tampered", good, pin=True)  # 6: one bit flipped after pinning
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 1
    (dataset / "tampered.pt").write_bytes(bytes(flipped))
    add_model(dataset, "garbage", os.urandom(4096))  # 7: right sha256, not TorchScript
    add_model(dataset, "newer-torch", newer_torch_bytes(dataset / "tiny-fold0.pt"))  # 7: saved by a newer torch
    add_model(dataset, "nan", nan_model_bytes(tmp_path / "nan.pt"))  # 8: loads, returns NaN
    result, report, working = kernel(built, "bad_models", COMPARE_ARGS, dataset=dataset)
    assert result.returncode == 0, result.stderr[-3000:]
    text = "\n".join(report["problems"])
    assert "steelkit-weights/missing.pt: missing" in text
    assert "truncated.pt: size" in text and "(truncated or replaced)" in text
    assert "tampered.pt: sha256" in text and "does not match the manifest" in text
    assert "garbage.pt: TorchScript load failed" in text
    assert "newer-torch.pt: TorchScript load failed" in text and "version 99" in text
    assert "nan: non-finite output (NaN or Inf)" in text and "dropped from later stages" in text
    assert report["models"] == ["tiny-fold0", "tiny-fold1"]
    for line in ("PROBLEM: " + p.splitlines()[0] for p in report["problems"][:3]):
        assert line in result.stdout
    reference, _ = baseline
    frame = valid_submission(built, working)
    assert frame["EncodedPixels"].tolist() == reference["EncodedPixels"].tolist()


def test_case_08_a_model_with_inf_output_is_left_out_of_the_ensemble_mean():
    from steelkit.kernel.predict import Ensemble, LoadedModel
    from steelkit.manifest import ModelEntry

    def entry(name):
        return ModelEntry.from_dict(
            {
                "name": name,
                "file": f"{name}.pt",
                "sha256": "0" * 64,
                "size": 1,
                "kind": "segmenter",
                "format": "torchscript",
                "architecture": "unet",
                "encoder": "x",
                "fold": 0,
                "classes": [1, 2, 3, 4],
                "activation": "sigmoid4",
                "input": {"scale": 1.0, "mean": [0.5], "std": [0.25]},
                "folds": 2,
                "train_size": [8, 16],
                "val_metric": {"name": "dice", "value": 0.5},
                "thresholds": {"pixel_threshold": [0.5] * 4},
            },
            "test",
        )

    class Constant(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, x):
            return torch.full((x.shape[0], 4, x.shape[2], x.shape[3]), self.value)

    models = [LoadedModel(entry("good"), Constant(0.0)), LoadedModel(entry("inf"), Constant(float("inf")))]
    ensemble = Ensemble(models, "none", torch.device("cpu"))
    probs, _ = ensemble(torch.zeros((2, 1, 8, 16), dtype=torch.uint8))
    assert torch.allclose(probs, torch.full_like(probs, 0.5))  # sigmoid(0) of the good model alone
    assert ensemble.failed_models() == ["inf"] and "inf: non-finite output" in ensemble.problems[0]


# ------------------------------------------------------------------------------------------------------ 9
def test_case_09_every_model_failing_falls_back_to_all_empty_loudly(built, tmp_path):
    dataset = copy_dataset(built, "all_nan")
    manifest = json.loads((dataset / "weights_manifest.json").read_text())
    data = nan_model_bytes(tmp_path / "nan.pt")
    for entry in manifest["models"]:
        (dataset / entry["file"]).write_bytes(data)
        entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (dataset / "weights_manifest.json").write_text(json.dumps(manifest))
    result, report, working = kernel(built, "all_nan", KERNEL_ARGS, dataset=dataset)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = valid_submission(built, working)
    assert (frame["EncodedPixels"] == "").all()
    assert report["outcome"] == "all-empty written (every model failed)"
    assert "PROBLEM: every segmenter failed: the all-empty submission stands" in result.stdout
    assert [s["name"] for s in report["timeline"]] == ["predict"]  # nothing runs on models that do not work


def test_case_09_no_model_that_loads_leaves_the_all_empty_submission(built):
    root = built["root"] / "faults" / "nomodel"
    dist = root / "dist" / "steelkit-weights"
    shutil.copytree(built["dist"], dist)
    for pt in dist.glob("*.pt"):
        pt.write_bytes(b"garbage")
    input_root = simulate_kaggle_input(root, built["competition"], dist)
    result = run_kernel_subprocess(input_root, root / "working", ["--device", "cpu", "--num-workers", "0"])
    assert result.returncode == 0
    report = json.loads((root / "working" / "kernel_report.json").read_text())
    assert report["outcome"] == "all-empty written" and report["models"] == []
    assert any("no usable model" in p for p in report["problems"])
    sample = read_sample_submission(built["competition"] / "sample_submission.csv")
    frame = read_submission(root / "working" / "submission.csv", sample, SHAPE)
    assert (frame["EncodedPixels"] == "").all()


# ------------------------------------------------------------------------------------------------------ 10
def test_case_10_out_of_memory_halves_the_batch_and_changes_nothing(built, compare_dist, baseline):
    args = COMPARE_ARGS + ["--batch-size", "4", "--memory-cap", "1"]
    result, report, working = kernel(built, "oom", args, dataset=compare_dist)
    assert result.returncode == 0, result.stderr[-3000:]
    text = "\n".join(report["problems"])
    assert "out of memory (simulated out of memory: 4 images > memory cap 1); batch halved to 2" in text
    assert "batch halved to 1" in text
    reference, _ = baseline
    assert valid_submission(built, working)["EncodedPixels"].tolist() == reference["EncodedPixels"].tolist()


def test_case_10_out_of_memory_on_a_single_image_fails_the_stage_and_keeps_the_all_empty(built):
    result, report, working = kernel(built, "oom1", KERNEL_ARGS + ["--batch-size", "2", "--memory-cap", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (valid_submission(built, working)["EncodedPixels"] == "").all()
    assert "stage predict failed: OutOfMemoryError: simulated out of memory" in "\n".join(report["problems"])


# ------------------------------------------------------------------------------------------------------ 11
#: the stages each time-limit case runs: the stopped one and those before it (later ones are tested elsewhere)
UP_TO = {
    "predict": [],
    "oof": ["oof"],
    "search": ["oof", "search"],
    "pseudo": ["oof", "search", "pseudo"],
    "averaging": ["oof", "search", "pseudo", "averaging"],
}


@pytest.mark.parametrize(
    "stage, written_by",
    [("predict", "ensemble"), ("oof", "ensemble"), ("search", "ensemble"), ("pseudo", None), ("averaging", None)],
)
def test_case_11_the_time_limit_in_the_middle_of_a_stage_keeps_the_last_submission(built, stage, written_by):
    args = KERNEL_ARGS + ["--batch-size", "2", "--simulate-timeout", stage, "--stages", *UP_TO[stage]]
    args += ["--pseudo-confidence", "0.999", "1.0", "--pseudo-steps", "2"]  # every test image confident: fine-tune
    result, report, working = kernel(built, f"timeout_{stage}", args)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = valid_submission(built, working)
    log = next(s for s in report["timeline"] if s["name"] == stage)
    assert log["outcome"] == "stopped at deadline", log
    text = "\n".join(report["problems"])
    assert f"stage {stage} stopped at deadline; keeping the submission written after" in text
    assert f"{stage} reached the simulated time limit" in json.dumps(report["timeline"])
    assert report["timeline"][-1]["name"] == "write" and report["timeline"][-1]["outcome"] == "done"
    if written_by:
        assert report["counts"]["written_by"] == written_by
    if stage == "predict":  # stopped after the first batch of 2: those two images predicted, the rest empty
        assert report["counts"]["predicted"] == 2
        assert "time limit: test prediction stopped after 2/6 images" in text
    if stage == "search":  # settings the file was not written with are not kept
        assert report["postprocess"] == {} or report["postprocess"]["gate"] == "none"
    assert len(frame) == 24


def test_case_11_a_simulated_time_limit_is_validated_and_counts_checks():
    from steelkit.kernel import KernelSettings
    from steelkit.kernel.plan import Deadline, ExpiringDeadline, StageTimeout

    assert KernelSettings(simulate_timeout=("oof:3", "predict")).timeout_checks() == {"oof": 3, "predict": 1}
    for bad in ("nope", "oof:0", "oof:x"):
        with pytest.raises(ValueError, match="must be STAGE or STAGE:N"):
            KernelSettings(simulate_timeout=(bad,))
    deadline = ExpiringDeadline(Deadline.unlimited(stage="oof"), after=3)
    deadline.check()
    deadline.check()
    assert not deadline.passed
    with pytest.raises(StageTimeout, match="oof reached the simulated time limit at check 3"):
        deadline.check()
    assert deadline.passed


# ------------------------------------------------------------------------------------------------------ 12
def test_case_12_a_working_folder_that_cannot_be_created_is_named(built, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the working folder should be")
    working = blocker / "working"
    result, report, _ = kernel(built, "unwritable", KERNEL_ARGS, working=working, create=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"FAILED: OSError: cannot create the working folder {working}: Not a directory" in result.stdout
    assert f"steelkit bootstrap: cannot write {working / 'submission.csv'}" in result.stdout
    assert report is None and not working.exists()


def test_case_12_a_full_disk_leaves_no_partial_submission(built):
    """A file-size limit (RLIMIT_FSIZE) makes every write above 200 kB fail with EFBIG, as a full disk fails them
    with ENOSPC: the all-empty submission of 4,006 images (about 290 kB) cannot be written, the smaller files can."""
    competition = copy_competition(built, "full_disk")
    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str, keep_default_na=False)
    ids = [f"absent{i:05d}.jpg" for i in range(4000)]
    rows = pd.DataFrame({"ImageId": np.repeat(ids, 4), "EncodedPixels": "1 1", "ClassId": ["1", "2", "3", "4"] * 4000})
    pd.concat([sample, rows[sample.columns]]).to_csv(competition / "sample_submission.csv", index=False)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result, report, working = kernel(
        built, "full_disk", KERNEL_ARGS, competition=competition, preexec_fn=limit_file_size
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cannot write {working / 'submission.csv'}: File too large" in result.stderr
    assert f"steelkit bootstrap: cannot write {working / 'submission.csv'}" in result.stdout
    assert not (working / "submission.csv").exists()
    assert [p.name for p in working.iterdir() if "submission" in p.name] == []  # no temporary leftovers
    assert report["outcome"] == "failed: no submission written" and "File too large" in report["problems"][0]


# ------------------------------------------------------------------------------------------------------ 13
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported (this steelkit reads 1)"),
        (lambda m: m["models"][0].pop("sha256"), "models[0]"),
        (lambda m: m.pop("models"), "models"),
    ],
    ids=["schema-version", "model-field", "models"],
)
def test_case_13_a_bad_manifest_is_named_and_the_all_empty_submission_stands(built, change, message):
    dataset = copy_dataset(built, "bad_manifest")
    path = dataset / "weights_manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    result, report, working = kernel(built, "bad_manifest", KERNEL_ARGS, dataset=dataset)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (valid_submission(built, working)["EncodedPixels"] == "").all()
    problem = report["problems"][0]
    assert problem.startswith("ValueError: ") and "steelkit-weights/weights_manifest.json: " in problem, problem
    assert message in problem and "keeping the submission written after all-empty" in problem
    assert "PROBLEM: ValueError: " in result.stdout


# ------------------------------------------------------------------------------------------------------ 14
def test_case_14_no_competition_folder_lists_what_was_found(built, tmp_path):
    input_root = tmp_path / "input"
    input_root.mkdir()
    (input_root / "steelkit-weights").symlink_to(built["dist"], target_is_directory=True)
    (input_root / "some-other-competition").mkdir()
    (input_root / "some-other-competition" / "train.csv").write_text("x\n")
    working = tmp_path / "working"
    result = run_kernel_subprocess(input_root, working, KERNEL_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no competition folder (sample_submission.csv + test_images/) under {input_root}; found:" in result.stderr
    assert "some-other-competition/" in result.stderr and "steelkit-weights/" in result.stderr
    assert f"no sample_submission.csv under {input_root}; cannot write a submission" in result.stdout
    report = json.loads((working / "kernel_report.json").read_text())
    assert report["outcome"] == "failed: no submission written" and "some-other-competition/" in report["problems"][0]
    assert not (working / "submission.csv").exists()


# ------------------------------------------------------------------------------------------------------ 15-17
def _train_csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "train.csv"
    path.write_text("ImageId,ClassId,EncodedPixels\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    "rle, problem",
    [
        ("1 2 9", "odd number of tokens"),
        ("24570 10", "runs past the image of 64x384 = 24576 pixels"),
        ("1 5 3 4", "overlaps the previous run"),
        ("1 x", "token 'x' is not an integer"),
        ("0 3", "starts are 1-based"),
    ],
    ids=["odd", "out-of-range", "overlapping", "non-numeric", "zero-start"],
)
def test_case_15_malformed_rle_rows_name_file_row_and_problem(tmp_path, rle, problem):
    path = _train_csv(tmp_path, ["a.jpg,1,1 3", f"b.jpg,2,{rle}"])
    with pytest.raises(ValueError, match=rf"train.csv: row 3: .*b\.jpg.*class 2.*{problem}"):
        read_labels(path, SHAPE)
    labels = read_labels(path, SHAPE, on_error="skip")
    assert labels.skipped == 1 and list(labels.frame["ImageId"]) == ["a.jpg"]


#: `steelkit train` overrides that make cpu-tiny train in a second or two on the tiny competition
FAST_TRAIN = ["data.num_workers=0", "data.train_folds=[0]", "data.batch_size=2", "data.crops=[[32,64]]"]
FAST_TRAIN += ["model.encoder=tu-test_efficientnet", "model.decoder_channels=[16,16,8,8,8]"]


def test_case_15_training_skips_and_counts_malformed_rows_when_asked(built, tmp_path, capsys):
    from steelkit.cli import main

    competition = tmp_path / "competition"
    shutil.copytree(built["competition"], competition)
    with open(competition / "train.csv", "a") as handle:
        first = sorted(p.name for p in (competition / "train_images").glob("*.jpg"))[0]
        handle.write(f"{first},2,5 x\n")
    command = ["train", "--config", "cpu-tiny", "--data", str(competition), "--out", str(tmp_path / "runs"), "--quiet"]
    command += ["--set", "optim.epochs=1", "optim.steps_per_epoch=1", *FAST_TRAIN]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{competition / 'train.csv'}: row " in err and "'x' is not an integer" in err
    assert not (tmp_path / "runs").exists()
    assert main(command + ["--skip-bad-rows"]) == 0
    assert f"{competition / 'train.csv'}: skipped 1 malformed row(s)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "runs" / "cpu-tiny" / "summary.json").read_text())
    assert summary["skipped_rows"] == 1


def test_case_16_duplicate_rows_and_unknown_class_ids_are_refused(tmp_path):
    path = _train_csv(tmp_path, ["a.jpg,1,1 3", "b.jpg,2,5 2", "a.jpg,1,9 3"])
    with pytest.raises(ValueError, match=r"train.csv: row 4: duplicate row for image a.jpg class 1 \(first at row 2\)"):
        read_labels(path, SHAPE)
    path = _train_csv(tmp_path, ["a.jpg,1,1 3", "b.jpg,5,5 2", "c.jpg,x,1 1"])
    wanted = r"train.csv: row 3: class id '5' is not one of \[1, 2, 3, 4\] \(2 such rows\)"
    with pytest.raises(ValueError, match=wanted):
        read_labels(path, SHAPE)
    old = tmp_path / "old.csv"
    old.write_text("ImageId_ClassId,EncodedPixels\na.jpg_1,1 3\na.jpg,\n")
    with pytest.raises(ValueError, match="old.csv: row 3: ImageId_ClassId 'a.jpg' is not '<image>_<class>'"):
        read_labels(old, SHAPE)


def test_case_17_images_named_by_train_csv_but_missing_are_listed_with_rows(built, tmp_path):
    from steelkit.data import load_training_set

    competition = tmp_path / "competition"
    shutil.copytree(built["competition"], competition)
    labels = read_labels(competition / "train.csv", SHAPE)
    gone = sorted(set(labels.frame["ImageId"]))[:2]
    for image_id in gone:
        (competition / "train_images" / image_id).unlink()
    with pytest.raises(ValueError) as err:
        load_training_set(competition)
    message = str(err.value)
    assert f"{competition / 'train.csv'}: 2 images are not in train_images/" in message
    row = int(labels.frame.loc[labels.frame["ImageId"] == gone[0], "row"].iloc[0])
    assert f"row {row}: {gone[0]}" in message


# ------------------------------------------------------------------------------------------------------ 18
def test_case_18_a_run_killed_during_an_epoch_resumes_without_losing_the_best_checkpoint(built, tmp_path):
    """``kill -9`` right after the first epoch's checkpoints (so inside a later epoch), then the same command again:
    it resumes from ``last.pt``, runs every epoch exactly once, and the best checkpoint written before the kill is
    intact (and kept unless a later epoch beats it)."""
    epochs = 6
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "steelkit", "train", "--config", "cpu-tiny", "--data", str(built["competition"])]
    command += ["--out", str(runs), "--quiet", "--set", f"optim.epochs={epochs}", *FAST_TRAIN]
    fold = runs / "cpu-tiny" / "fold0"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (fold / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()[-2000:]}"
        time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    done_before = len((fold / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= done_before < epochs and not (fold / "fold_summary.json").exists()
    best = torch.load(fold / "best.pt", weights_only=False)  # loads: never half-written
    assert best["epoch"] < done_before
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"fold 0: resuming after epoch {done_before} from" in resumed.stderr + resumed.stdout
    rows = json.loads((fold / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(epochs))  # every epoch once: none lost, none repeated
    key = next(k for k in rows[0] if k.startswith("val_"))  # the fold's metric
    scores = [r[key] for r in rows]
    best_after = torch.load(fold / "best.pt", weights_only=False)
    assert best_after["epoch"] == int(np.argmax(scores))
    if best_after["epoch"] == best["epoch"]:  # no later epoch beat it: the very same weights survived the kill
        assert all(torch.equal(best["state_dict"][k], v) for k, v in best_after["state_dict"].items())
    assert (fold / "fold_summary.json").is_file() and [p.name for p in fold.iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------------------------ 19
def test_case_19_build_dataset_refuses_a_missing_weight_file(built, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(built["runs"] / "export", export)
    (export / "tiny-fold0.pt").unlink()
    result = subprocess.run(
        [sys.executable, "build_dataset.py", "--manifest", str(export / "weights_manifest.json"), "--out"]
        + [str(tmp_path / "out"), "--dataset-id", "me/steelkit-weights"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert f"{export / 'tiny-fold0.pt'}: missing" in result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_case_19_build_dataset_refuses_a_manifest_that_disagrees_with_its_files(built, tmp_path):
    from steelkit.packaging import build_dataset

    export = tmp_path / "export"
    shutil.copytree(built["runs"] / "export", export)
    with open(export / "tiny-fold1.pt", "ab") as handle:
        handle.write(b"appended")
    with pytest.raises(ValueError, match="disagrees with its files:\n  .*tiny-fold1.pt: size"):
        build_dataset(export / "weights_manifest.json", tmp_path / "out", "me/steelkit-weights")
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.*")) == []


@pytest.mark.parametrize("dataset_id", ["noslash", "me/ab", "me/Upper-Case", "me/bad--dash", "me/-x-y", "a b/cdefgh"])
def test_case_19_build_dataset_refuses_ids_kaggle_would_reject(built, tmp_path, dataset_id):
    from steelkit.packaging import build_dataset

    with pytest.raises(ValueError, match="owner/slug"):
        build_dataset(built["runs"] / "export" / "weights_manifest.json", tmp_path / "out", dataset_id)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ 20
@pytest.mark.parametrize(
    "override, listed",
    [
        ("model.arch=unetplusplus", ["unet", "fpn", "deeplabv3plus"]),
        ("model.encoder=resnet9000", ["resnet18", "efficientnet-b3"]),
        ("loss.terms=[{name: huber}]", ["bce", "dice", "lovasz"]),
    ],
    ids=["architecture", "encoder", "loss"],
)
def test_case_20_unknown_names_are_refused_with_the_valid_ones_listed(override, listed, capsys):
    from steelkit.cli import main

    code = main(["train", "--config", "cpu-tiny", "--data", "nowhere", "--out", "nowhere", "--set", override])
    assert code == 2
    text = capsys.readouterr().err
    assert text.startswith("steelkit train: error: ") and text.count("\n") == 1
    for name in listed:
        assert name in text, text


def test_case_20_an_unknown_preset_lists_the_presets(capsys):
    from steelkit.cli import main

    code = main(["train", "--config", "second-place", "--data", "x", "--out", "y"])
    text = capsys.readouterr().err
    assert code == 2 and "second-place" in text
    assert all(name in text for name in ("cpu-tiny", "first-place", "twelfth-place"))


# ------------------------------------------------------------------------------------------------------ fuzz
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: tokens a broken RLE is made of: numbers of every size and sign, floats, words, odd whitespace
TOKENS = st.one_of(
    st.integers(-5, 30_000).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "nan", "1e3", "0x10", "+5", "-0", "١٢", "\u00a0", "\t", ",", '"']),
    st.text(max_size=4),
)
RLE = st.one_of(st.lists(TOKENS, max_size=12).map(" ".join), st.text(max_size=40))


@settings(max_examples=300, deadline=None)
@given(rle=RLE)
def test_fuzz_rle_strings_are_accepted_or_refused_with_value_error(rle):
    from steelkit.rle import decode, encode, parse_runs

    try:
        mask = decode(rle, SHAPE)
    except ValueError as err:
        assert str(err)
        with pytest.raises(ValueError):
            parse_runs(rle, SHAPE)
        return
    assert mask.shape == SHAPE and set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(decode(encode(mask), SHAPE), mask)  # what was accepted re-encodes to the same pixels


CELL = st.one_of(
    st.sampled_from(["1", "2", "3", "4", "0", "5", "x", "", "1 1", "1 3 10 2", "5 x", "a.jpg", "a.jpg_1", "a.jpg_"]),
    st.text(max_size=12),
)
HEADERS = st.sampled_from(
    [
        "ImageId,ClassId,EncodedPixels",
        "ImageId,EncodedPixels,ClassId",
        "ImageId_ClassId,EncodedPixels",
        "ImageId,ClassId",
        "",
        "a,b,c,d",
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=HEADERS, rows=st.lists(st.lists(CELL, min_size=0, max_size=4), max_size=6), raw=st.text(max_size=30))
def test_fuzz_csv_rows_are_read_or_refused_with_value_error(tmp_path, header, rows, raw):
    import csv
    import io

    from steelkit.csvio import read_labels, read_sample_submission

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(row)
    path = tmp_path / "fuzz.csv"
    path.write_text(header + "\n" + buffer.getvalue() + raw)
    for reader in (lambda p: read_labels(p, SHAPE), read_sample_submission):
        try:
            result = reader(path)
        except ValueError as err:
            assert str(err)
            continue
        frame = result.frame
        assert set(frame["ClassId"]) <= {1, 2, 3, 4}
        assert not frame.duplicated(["ImageId", "ClassId"]).any()
