"""Training: every preset trains through the one loop; resume equals an uninterrupted run; top-k checkpoints and
greedy averaging; DistributedDataParallel on 2 CPU processes (gloo)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from steelkit.config import TrainConfig, load_recipe, preset_names
from steelkit.data import assign_folds, load_training_set
from steelkit.export import export_run
from steelkit.manifest import load_manifest
from steelkit.synth import synthesize
from steelkit.train import load_checkpoint, train, train_fold, train_recipe

#: tiny and non-square: 64x256 images, trained at half resolution on 32x64 crops
SHAPE = (64, 256)


def tiny_overrides(epochs=1, steps=1, folds=(0,)):
    """What makes any preset train in seconds on 2 CPU cores: no pretrained weights, tiny crops, few steps."""
    return {
        "model": {"encoder_weights": None},
        "data": {
            "scale": 0.5,
            "crops": [[32, 64], [32, 96]],
            "batch_size": 2,
            "num_workers": 0,
            "folds": 2,
            "train_folds": list(folds),
        },
        "optim": {"epochs": epochs, "steps_per_epoch": steps, "warmup_steps": 0, "accumulate": 1},
        "averaging": {"bn_batches": 2},
    }


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synthesize(root / "competition", 16, 4, seed=5, height=SHAPE[0], width=SHAPE[1], progress=False)
    return root / "competition"


#: sources every preset must name
EXPECTED_PRESETS = {
    "bionda",
    "cpu-tiny",
    "first-place",
    "fourth-place",
    "hse",
    "nie-deeplab",
    "twelfth-place",
    "ucsd",
}


def test_every_preset_is_listed_with_its_source():
    assert EXPECTED_PRESETS <= set(preset_names())
    for name in EXPECTED_PRESETS:
        recipe = load_recipe(name)
        assert recipe.source and recipe.description, name


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_every_preset_trains_one_step(preset, competition, tmp_path):
    recipe = load_recipe(preset, tiny_overrides())
    assert all(job.model.encoder_weights is None for job in recipe.jobs)
    summary = train_recipe(recipe, competition, tmp_path / "runs", device="cpu", progress=False)
    assert set(summary["jobs"]) == {job.name for job in recipe.jobs}
    for job in recipe.jobs:
        fold_dir = tmp_path / "runs" / job.name / "fold0"
        ckpt = load_checkpoint(fold_dir / "final.pt")
        assert ckpt["config"]["name"] == job.name and ckpt["fold"] == 0 and ckpt["epoch"] == 0
        assert np.isfinite(ckpt["metric"]["value"])
        if job.model.kind == "segmenter":
            oof = np.load(fold_dir / "oof.npy")
            assert oof.dtype == np.uint8 and oof.shape[1:] == (len(job.model.classes), 32, 128)
        if job.model.kind == "classifier" or job.model.aux_head:
            labels = np.load(fold_dir / "oof_labels.npy")
            assert labels.shape[1] == job.model.outputs if job.model.kind == "classifier" else len(job.model.classes)
    shutil.rmtree(tmp_path / "runs")  # real-size encoders: up to a few GB per preset


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_every_preset_full_tiny_run_exports_to_torchscript(preset, competition, tmp_path):
    """Both folds, 3 epochs of 3 steps, then TorchScript export of every model into one manifest."""
    recipe = load_recipe(preset, tiny_overrides(epochs=3, steps=3, folds=(0, 1)))
    train_recipe(recipe, competition, tmp_path / "runs", device="cpu", progress=False)
    manifest = export_run(tmp_path / "runs", competition)
    entries = load_manifest(manifest.folder / "weights_manifest.json").models
    shutil.rmtree(tmp_path / "runs")  # real-size encoders: several GB per preset
    expected = {f"{job.name}-fold{k}": job.model.kind for job in recipe.jobs for k in (0, 1)}
    assert {m.name: m.kind for m in entries} == expected
    for entry in entries:
        assert entry.activation == recipe.job(entry.extra["job"]).model.head


def test_loss_schedule_and_crop_alternation_show_in_the_metrics(competition, tmp_path):
    recipe = load_recipe("bionda", tiny_overrides(epochs=3))
    job = recipe.job("bionda-unet-effb3")
    job = TrainConfig.from_dict(
        {
            **job.to_dict(),
            "loss": {
                "stages": [
                    {"terms": [{"name": "bce"}]},
                    {"start_epoch": 2, "terms": [{"name": "tversky", "alpha": 0.3}]},
                ]
            },
        }
    )
    train(job, competition, tmp_path / "run", device="cpu", progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "fold0" / "metrics.csv")
    assert metrics["loss_stage"].tolist() == [0, 0, 1]
    assert metrics["crop"].tolist() == ["32x64", "32x96", "32x64"]
    assert {"val_dice_postprocessed", "val_iou_at_0.5", "lr"} <= set(metrics.columns)


def _cfg(**optim):
    return TrainConfig.from_dict(
        {
            "name": "resume",
            "seed": 1,
            "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 8]},
            "data": {"scale": 0.5, "crops": [[32, 64]], "batch_size": 2, "num_workers": 0, "folds": 2},
            "optim": {"epochs": 3, "steps_per_epoch": 2, "schedule": "plateau", "plateau_patience": 0, **optim},
        }
    )


def test_resume_after_an_interruption_equals_an_uninterrupted_run(competition, tmp_path):
    cfg = _cfg(top_k=2, optimizer="adamw", accumulate=2)
    data = load_training_set(competition)
    folds = assign_folds(data.flags, 2, cfg.seed)
    device = torch.device("cpu")
    whole = train_fold(cfg, data, folds, 0, tmp_path / "whole", device, progress=False)
    interrupted = train_fold(cfg, data, folds, 0, tmp_path / "split", device, progress=False, stop_after_epochs=1)
    assert interrupted == {"fold": 0, "interrupted_after_epoch": 1}
    assert not (tmp_path / "split" / "fold0" / "final.pt").exists()
    assert (tmp_path / "split" / "fold0" / "best.pt").exists()  # the best so far survives the interruption
    resumed = train_fold(cfg, data, folds, 0, tmp_path / "split", device, progress=False)
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["best_metric"] == whole["best_metric"]
    assert not (tmp_path / "split" / "fold0" / "last.pt").exists()  # deleted once the fold is complete
    assert train_fold(cfg, data, folds, 0, tmp_path / "split", device, progress=False) == resumed  # not retrained
    for name in ["final.pt"] + sorted(p.name for p in (tmp_path / "whole" / "fold0").glob("epoch*.pt")):
        a = load_checkpoint(tmp_path / "whole" / "fold0" / name)["state_dict"]
        b = load_checkpoint(tmp_path / "split" / "fold0" / name)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "whole" / "fold0" / "metrics.csv"),
        pd.read_csv(tmp_path / "split" / "fold0" / "metrics.csv"),
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "whole" / "fold0" / "oof.npy"), np.load(tmp_path / "split" / "fold0" / "oof.npy")
    )


def test_top_k_checkpoints_and_greedy_average(competition, tmp_path):
    cfg = TrainConfig.from_dict({**_cfg(top_k=2).to_dict(), "averaging": {"greedy": True, "recalibrate_bn": False}})
    data = load_training_set(competition)
    folds = assign_folds(data.flags, 2, cfg.seed)
    result = train_fold(cfg, data, folds, 0, tmp_path, torch.device("cpu"), progress=False)
    fold_dir = tmp_path / "fold0"
    kept = sorted(p.name for p in fold_dir.glob("epoch*.pt"))
    assert len(kept) == 2  # top-2 of 3 epochs; the third was deleted
    metrics = pd.read_csv(fold_dir / "metrics.csv")["val_dice_postprocessed"].to_numpy()
    best_two = sorted(np.argsort(-metrics, kind="stable")[:2])
    assert kept == [f"epoch{e:03d}.pt" for e in best_two]
    averaged = load_checkpoint(fold_dir / "averaged.pt")
    assert averaged["averaging"]["chosen"] and set(averaged["averaged_from"]) <= set(best_two)
    final = load_checkpoint(fold_dir / "final.pt")
    assert final["metric"]["value"] == pytest.approx(max(averaged["metric"]["value"], metrics.max()))
    assert result["exported_metric"] == pytest.approx(final["metric"]["value"])


def test_early_stopping_ends_the_fold(competition, tmp_path):
    cfg = _cfg(epochs=6, lr=1e-9, early_stopping=1)  # nothing improves after the first epoch
    data = load_training_set(competition)
    folds = assign_folds(data.flags, 2, cfg.seed)
    result = train_fold(cfg, data, folds, 0, tmp_path, torch.device("cpu"), progress=False)
    assert result["epochs_run"] < 6


def test_ddp_on_two_cpu_processes_ends_with_identical_weights(competition, tmp_path):
    recipe_file = tmp_path / "ddp.yaml"
    recipe_file.write_text(
        "name: ddp\nseed: 0\nmodel: {arch: unet, encoder: resnet18, decoder_channels: [16, 16, 8, 8, 8]}\n"
        "data: {scale: 0.5, crops: [[32, 64]], batch_size: 2, num_workers: 0, folds: 2, train_folds: [0]}\n"
        "optim: {epochs: 2, steps_per_epoch: 2}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    command += ["-m", "steelkit", "train", "--config", str(recipe_file), "--data", str(competition)]
    command += ["--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["folds"][0]["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "x2 ranks" in result.stdout
