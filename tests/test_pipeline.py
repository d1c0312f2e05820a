"""End to end on a tiny synthetic competition: train -> TorchScript export -> dataset folder -> offline kernel."""

import json
import shutil
import warnings

import pytest
import torch

from steelkit.config import TrainConfig
from steelkit.csvio import read_sample_submission, read_submission
from steelkit.demo import offline_prefix, run_kernel_subprocess, simulate_kaggle_input
from steelkit.export import export_run
from steelkit.manifest import load_manifest, verify_files
from steelkit.packaging import build_dataset
from steelkit.synth import synthesize
from steelkit.train import train

#: tiny and non-square: 64x384 images, trained at half resolution on 32x128 crops
SHAPE = (64, 384)
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"arch": "unet", "encoder": "tu-test_efficientnet", "decoder_channels": [16, 16, 8, 8, 8]},
    "data": {"scale": 0.5, "crops": [[32, 128]], "batch_size": 4, "num_workers": 0, "folds": 2},
    "optim": {"lr": 0.003, "epochs": 2, "steps_per_epoch": 2},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    competition = root / "competition"
    synthesize(competition, 16, 6, seed=3, height=SHAPE[0], width=SHAPE[1], progress=False)
    runs = root / "runs"
    summary = train(TrainConfig.from_dict(TINY), competition, runs, device="cpu", progress=False)
    manifest = export_run(runs, competition)
    dist = root / "dist" / "steelkit-weights"
    build_dataset(runs / "export" / "weights_manifest.json", dist, "tester/steelkit-weights")
    return {
        "root": root,
        "competition": competition,
        "runs": runs,
        "summary": summary,
        "manifest": manifest,
        "dist": dist,
    }


def test_training_writes_checkpoints_metrics_and_uint8_oof(built):
    import numpy as np

    runs = built["runs"]
    for fold in (0, 1):
        ckpt = torch.load(runs / f"fold{fold}" / "best.pt", weights_only=False)
        assert ckpt["fold"] == fold and ckpt["config"]["name"] == "tiny" and 0 <= ckpt["metric"]["value"] <= 1
        oof = np.load(runs / f"fold{fold}" / "oof.npy")
        ids = (runs / f"fold{fold}" / "oof_ids.txt").read_text().split()
        assert oof.dtype == np.uint8 and oof.shape == (len(ids), 4, 32, 192)
    folds = (runs / "folds.csv").read_text().splitlines()
    assert folds[0] == "ImageId,fold" and len(folds) == 17


def test_export_manifest_and_scripted_model(built):
    manifest = load_manifest(built["runs"] / "export" / "weights_manifest.json")
    assert [m.name for m in manifest.models] == ["tiny-fold0", "tiny-fold1"]
    entry = manifest.models[0]
    assert entry.input["scale"] == 0.5 and entry.train_size == [32, 192] and entry.extra["fold_file"] == "folds.csv"
    assert len(manifest.postprocess["pixel_threshold"]) == 4
    assert (manifest.folder / "threshold_search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    good, problems = verify_files(manifest)
    assert len(good) == 2 and problems == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(manifest.path_of(entry.file)))
    # scripted (not traced): BatchNorm follows train/eval, so the kernel can fine-tune it
    x = torch.randn(2, 3, 32, 64)
    scripted.eval()
    before = scripted(x)
    scripted.train()
    stats = [b.clone() for n, b in scripted.named_buffers() if n.endswith("running_mean")]
    scripted(x).mean().backward()
    after = [b for n, b in scripted.named_buffers() if n.endswith("running_mean")]
    assert any(not torch.equal(a, b) for a, b in zip(stats, after))
    assert any(p.grad is not None for p in scripted.parameters())
    scripted.eval()
    assert not torch.equal(before, scripted(x))  # running statistics moved: eval output changed


def test_dataset_folder_is_ready_for_kaggle(built):
    dist = built["dist"]
    names = sorted(p.name for p in dist.iterdir())
    assert names == sorted(
        [
            "dataset-metadata.json",
            "folds.csv",
            "steelkit-0.1.0-py3-none-any.whl",
            "tiny-fold0.pt",
            "tiny-fold1.pt",
            "weights_manifest.json",
        ]
    )
    meta = json.loads((dist / "dataset-metadata.json").read_text())
    assert meta == {"title": "steelkit-weights", "id": "tester/steelkit-weights", "licenses": [{"name": "CC0-1.0"}]}


@pytest.mark.parametrize("nested", [False, True])
def test_kernel_runs_offline_from_the_dataset_folder(built, nested):
    root = built["root"] / ("nested" if nested else "classic")
    input_root = simulate_kaggle_input(root, built["competition"], built["dist"], nested=nested)
    result = run_kernel_subprocess(input_root, root / "working", ["--device", "cpu", "--num-workers", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert offline_prefix() == ["unshare", "-rn"], "this machine should run the kernel with networking disabled"
    # steelkit was imported from the wheel installed with --no-index into the working folder, not from the checkout
    assert f"steelkit 0.1.0 from {root / 'working' / '.steelkit_packages' / 'steelkit'}" in result.stdout
    sample = read_sample_submission(built["competition"] / "sample_submission.csv")
    frame = read_submission(root / "working" / "submission.csv", sample, SHAPE)
    assert len(frame) == 6 * 4
    report = json.loads((root / "working" / "kernel_report.json").read_text())
    assert report["outcome"].endswith(" written") and report["outcome"] != "all-empty written"
    assert report["models"] == ["tiny-fold0", "tiny-fold1"]
    assert report["problems"] == [] and report["counts"]["predicted"] == 6
    assert [s["name"] for s in report["timeline"]] == ["predict", "oof", "search", "pseudo", "averaging", "write"]


def test_tampered_weight_is_refused_and_the_rest_still_submit(built):
    root = built["root"] / "tampered"
    dist = root / "dist" / "steelkit-weights"
    shutil.copytree(built["dist"], dist)
    data = bytearray((dist / "tiny-fold1.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (dist / "tiny-fold1.pt").write_bytes(bytes(data))
    input_root = simulate_kaggle_input(root, built["competition"], dist)
    result = run_kernel_subprocess(input_root, root / "working", ["--device", "cpu", "--num-workers", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "working" / "kernel_report.json").read_text())
    assert report["models"] == ["tiny-fold0"]
    assert any("tiny-fold1.pt: sha256" in p for p in report["problems"])
    assert report["outcome"].endswith(" written") and report["outcome"] != "all-empty written"
    sample = read_sample_submission(built["competition"] / "sample_submission.csv")
    read_submission(root / "working" / "submission.csv", sample, SHAPE)


def test_no_usable_model_leaves_the_all_empty_submission(built):
    root = built["root"] / "nomodel"
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


@pytest.mark.parametrize(
    "dataset_id, match",
    [
        ("noslash", "owner/slug"),
        ("me/ab", "owner/slug"),
        ("me/Upper-Case", "owner/slug"),
        ("me/bad--dash", "owner/slug"),
        ("me/-x-y", "owner/slug"),
    ],
)
def test_build_dataset_refuses_ids_kaggle_would_reject(built, tmp_path, dataset_id, match):
    with pytest.raises(ValueError, match=match):
        build_dataset(built["runs"] / "export" / "weights_manifest.json", tmp_path / "out", dataset_id)
    assert not (tmp_path / "out").exists()


def test_build_dataset_refuses_a_manifest_that_disagrees_with_its_files(built, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(built["runs"] / "export", export)
    (export / "tiny-fold0.pt").unlink()
    with pytest.raises(ValueError, match="tiny-fold0.pt: missing"):
        build_dataset(export / "weights_manifest.json", tmp_path / "out", "me/steelkit-weights")
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.*")) == []


def test_without_the_wheel_the_bootstrap_writes_the_all_empty_submission(built, tmp_path):
    input_root = tmp_path / "input"
    input_root.mkdir()
    (input_root / "competition").symlink_to(built["competition"], target_is_directory=True)
    working = tmp_path / "working"
    working.mkdir()
    (working / "submission.csv").write_text("stale file from an earlier run\n")
    result = run_kernel_subprocess(input_root, working, ["--device", "cpu"], fresh=False)
    assert result.returncode == 0
    assert "FAILED: FileNotFoundError: no steelkit-*.whl" in result.stdout
    assert "wrote the all-empty submission" in result.stdout
    sample = read_sample_submission(built["competition"] / "sample_submission.csv")
    frame = read_submission(working / "submission.csv", sample, SHAPE)
    assert (frame["EncodedPixels"] == "").all()


def test_training_items_are_reproducible(built):
    """Crops and flips depend only on (seed, epoch, index): the same item twice is identical, another epoch differs."""
    from steelkit.data import SteelDataset, load_training_set

    data = load_training_set(built["competition"])
    cfg = TrainConfig.from_dict(TINY)
    defective = [i for i, flags in zip(data.image_ids, data.flags) if flags.any()]
    a = SteelDataset(data, defective, cfg.data, train=True, seed=5, epochs=2)
    b = SteelDataset(data, defective, cfg.data, train=True, seed=5, epochs=2)
    for i in range(len(defective)):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    b.set_epoch(1)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(len(defective)))
