"""End to end on a tiny synthetic competition: train -> TorchScript export -> dataset folder -> offline kernel."""

import json
import warnings

import pytest
import torch

from steelkit.config import TrainConfig
from steelkit.csvio import read_sample_submission, read_submission
from steelkit.demo import offline_prefix, run_kernel_subprocess, simulate_kaggle_input
from steelkit.manifest import load_manifest, verify_files
from tests.conftest import SHAPE, TINY


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
    assert report["counts"]["malloc_mmap_threshold"] == "65536"  # the bootstrap re-ran itself with the setting
    assert [s["name"] for s in report["timeline"]] == ["predict", "oof", "search", "pseudo", "averaging", "write"]


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
