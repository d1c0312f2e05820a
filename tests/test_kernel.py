"""The kernel's stages on a tiny synthetic competition: every stage inside a one-minute budget, the plain ensemble
when the budget is too small for more, a pseudo-label round that lowers out-of-fold Dice is rolled back, OOM halving,
TTA reductions and gating."""

import json
import time

import numpy as np
import pytest
import torch

from steelkit.config import recipe_from_dict
from steelkit.csvio import read_sample_submission, read_submission
from steelkit.demo import run_kernel_subprocess, simulate_kaggle_input
from steelkit.export import export_run
from steelkit.kernel import KernelSettings, run_kernel
from steelkit.kernel.pseudo import PseudoSettings, confidence_stats, select_confident
from steelkit.packaging import build_dataset
from steelkit.train import train_recipe

from .conftest import write_easy_competition

SHAPE = (64, 256)
#: a ResNet-18 Unet trained at half resolution for 72 steps: enough to beat the all-empty prediction on the easy
#: competition of conftest.write_easy_competition (about 25 s on 2 cores)
#: plus a ResN-18 "any defect" classifier for the gating stage
RECIPE = {
    "name": "ktiny",
    "defaults": {
        "seed": 0,
        "data": {"scale": 0.5, "batch_size": 8, "num_workers": 0, "folds": 2},
        "optim": {"lr": 0.01, "epochs": 12, "steps_per_epoch": 6, "schedule": "cosine"},
    },
    "jobs": [
        {"name": "ktiny", "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]}},
        {
            "name": "kgate",
            "model": {"kind": "classifier", "arch": "encoder", "encoder": "resnet18", "head": "binary"},
            "optim": {"epochs": 4},
            "loss": {"terms": [{"name": "bce"}]},
        },
    ],
}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel")
    competition = write_easy_competition(root, 48, 12, SHAPE, seed=0)
    labels = root / "test_labels.csv"
    train_recipe(recipe_from_dict(RECIPE), competition, root / "runs", device="cpu", progress=False)
    manifest = export_run(root / "runs", competition)
    dist = root / "dist" / "steelkit-weights"
    build_dataset(root / "runs" / "export" / "weights_manifest.json", dist, "tester/steelkit-weights")
    return {"root": root, "competition": competition, "labels": labels, "manifest": manifest, "dist": dist}


def settings(kit, working, **kwargs):
    base = dict(
        competition_dir=kit["competition"],
        dataset_dir=kit["dist"],
        working_dir=working,
        device="cpu",
        num_workers=0,
        batch_size=4,
        oof_scale=0.5,
        store_scale=0.5,
        search_repeats=4,
        stage_submissions=True,
        pseudo=PseudoSettings(low=0.3, high=0.6, label_low=0.45, label_high=0.55, steps=3, batch_size=4, snapshots=2),
    )
    base.update(kwargs)
    return KernelSettings(**base)


def valid_submission(kit, path):
    sample = read_sample_submission(kit["competition"] / "sample_submission.csv")
    frame = read_submission(path, sample, SHAPE)
    assert len(frame) == 12 * 4
    return frame


def test_every_stage_runs_inside_a_one_minute_budget(kit):
    """The real entry point, as a subprocess with networking disabled, every stage on, a 60 s budget."""
    root = kit["root"] / "minute"
    input_root = simulate_kaggle_input(root, kit["competition"], kit["dist"])
    args = ["--device", "cpu", "--num-workers", "0", "--time-limit", "60", "--oof-scale", "0.5", "--pseudo-steps", "3"]
    args += ["--stage-submissions", "--quiet", "--pseudo-confidence", "0.3", "0.6"]
    args += ["--pseudo-label-confidence", "0.45", "0.55"]
    start = time.perf_counter()
    result = run_kernel_subprocess(input_root, root / "working", args)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "working" / "kernel_report.json").read_text())
    assert report["stages"]["total"] < 60 and wall < 60 + 30  # + interpreter start and the offline pip install
    timeline = {s["name"]: s for s in report["timeline"]}
    assert list(timeline) == ["predict", "oof", "search", "pseudo", "averaging", "write"]
    assert all(s["outcome"] in ("done", "stopped at deadline") for s in timeline.values()), timeline
    assert report["plans"][0]["stages"][0]["name"] == "predict" and len(report["plans"]) == 6  # start + re-plans
    # a stage that finished records its out-of-fold Dice; on a loaded machine the last ones may stop at their deadline
    finished = {name for name, s in timeline.items() if s["outcome"] == "done"}
    assert {"predict", "oof", "search"} <= finished, timeline
    assert set(report["oof_dice"]) >= {"ensemble", "search"} | (finished & {"pseudo", "averaging"})
    if "pseudo" in finished:
        (round_,) = report["pseudo"]
        assert round_["pseudo_images"] > 0 and round_["outcome"] in ("kept", "rejected: out-of-fold Dice dropped")
    if "averaging" in finished:
        assert {a["model"] for a in report["averaging"]} == {"ktiny-fold0", "ktiny-fold1"}  # snapshots were candidates
    assert {"kernel_timeline.png", "search_curves.png"} <= set(report["figures"])
    for name in report["figures"]:
        assert (root / "working" / name).read_bytes()[:4] == b"\x89PNG"
    valid_submission(kit, root / "working" / "submission.csv")
    valid_submission(kit, root / "working" / "submission_ensemble.csv")


def test_a_budget_too_small_for_later_stages_still_writes_the_plain_ensemble(kit, tmp_path):
    """1.5 s: enough to load and predict 12 tiny images; the search alone is planned at 2 s or more, so it never
    fits; whatever else the planner fits must end inside the budget."""
    start = time.perf_counter()
    report = run_kernel(settings(kit, tmp_path, time_limit=1.5, safety_margin=0.0), progress=False)
    took = time.perf_counter() - start
    timeline = {s["name"]: s for s in report["timeline"]}
    assert timeline["predict"]["outcome"] in ("done", "stopped at deadline")
    assert report["outcome"] == "ensemble written"
    assert timeline["search"]["outcome"] == "dropped"
    # stages stop at their deadline between batches, so the last batch (the first one pays for warm-up) may overrun;
    # the bounds allow for a loaded machine (a batch of 8 tiny images takes well under a second unloaded)
    assert sum(s["actual_s"] for s in timeline.values()) < 1.5 + 4.0
    assert took < 1.5 + 4.0 + 5.0  # and the report and its figures are written after the budget
    valid_submission(kit, tmp_path / "submission.csv")
    assert (tmp_path / "submission.csv").read_text() == (tmp_path / "submission_ensemble.csv").read_text()


def test_a_pseudo_round_that_lowers_oof_dice_is_rolled_back(kit, tmp_path):
    """A destructive fine-tuning (huge learning rate) lowers out-of-fold Dice: the round is rejected, the models and
    out-of-fold predictions are restored, and no pseudo-label submission replaces the searched one."""
    destructive = PseudoSettings(
        low=0.3, high=0.6, label_low=0.45, label_high=0.55, steps=4, batch_size=4, lr=3.0, snapshots=1
    )
    report = run_kernel(
        settings(kit, tmp_path, stages=("oof", "search", "pseudo"), pseudo=destructive, time_limit=600),
        progress=False,
    )
    (round_,) = report["pseudo"]
    assert round_["pseudo_images"] > 0
    assert round_["oof_dice_after"] < round_["oof_dice_before"]
    assert round_["outcome"].startswith("rejected")
    assert report["oof_dice"]["pseudo"] == report["oof_dice"]["search"]  # weights and OOF restored
    assert not (tmp_path / "submission_pseudo1.csv").exists()
    assert report["outcome"] in ("ensemble written", "search written")


def test_out_of_memory_halves_the_batch_and_the_submission_is_unchanged(kit, tmp_path):
    plain = run_kernel(settings(kit, tmp_path / "a", stages=()), progress=False)
    capped = run_kernel(settings(kit, tmp_path / "b", stages=(), memory_cap=1), progress=False)
    assert any("out of memory" in p and "halved" in p for p in capped["problems"])
    assert plain["outcome"] == capped["outcome"] == "ensemble written"
    a = (tmp_path / "a" / "submission.csv").read_text()
    b = (tmp_path / "b" / "submission.csv").read_text()
    assert a == b


@pytest.mark.parametrize("tta, reduction", [("none", "mean"), ("hv", "mean"), ("hv", "sharpen")])
def test_tta_sets_and_reductions_write_valid_submissions(kit, tmp_path, tta, reduction):
    report = run_kernel(
        settings(kit, tmp_path, stages=(), tta=tta, reduction=reduction, temperature=0.5), progress=False
    )
    assert report["outcome"] == "ensemble written" and report["problems"] == []
    valid_submission(kit, tmp_path / "submission.csv")


def test_select_confident_needs_every_class_confident_and_the_classifier_to_agree():
    s = PseudoSettings(low=0.2, high=0.8, label_low=0.2, label_high=0.8, max_uncertain=0.5)
    max_prob = np.array([[0.1, 0.1, 0.9, 0.05], [0.1, 0.5, 0.9, 0.05], [0.1, 0.1, 0.95, 0.0], [0.0, 0.0, 0.0, 0.0]])
    uncertain = np.array([[0, 0, 0.1, 0], [0, 0.9, 0.1, 0], [0, 0, 0.7, 0], [0, 0, 0, 0]], dtype=float)
    # image 1 has an uncertain class 2; image 2 too many uncertain pixels in class 3
    np.testing.assert_array_equal(select_confident(max_prob, uncertain, None, s), [3, 0])
    labels = np.array([[0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.5, 0.1]])
    # with a classifier: image 3 is dropped because the classifier is unsure about class 3
    np.testing.assert_array_equal(select_confident(max_prob, uncertain, labels, s), [0])
    usable = np.array([False, True, True, True])
    np.testing.assert_array_equal(select_confident(max_prob, uncertain, labels, s, usable), [])
    # an "any defect" classifier broadcast to 4 classes: high on a defective image, low on a clean one
    any_defect = np.array([[0.9] * 4, [0.9] * 4, [0.9] * 4, [0.1] * 4])
    np.testing.assert_array_equal(
        np.sort(select_confident(max_prob, uncertain, any_defect, s, per_class_labels=False)), [0, 3]
    )
    unsure = np.array([[0.5] * 4, [0.9] * 4, [0.9] * 4, [0.9] * 4])
    np.testing.assert_array_equal(select_confident(max_prob, uncertain, unsure, s, per_class_labels=False), [])


def test_confidence_stats_on_a_hand_made_image():
    probs = np.zeros((4, 2, 5), dtype=np.uint8)
    probs[2] = [[255, 255, 100, 0, 0], [230, 0, 0, 0, 0]]  # above low (51): 4 pixels, 1 of them below high (204)
    max_prob, uncertain = confidence_stats(probs, 0.2, 0.8)
    np.testing.assert_allclose(max_prob, [0, 0, 1, 0])
    np.testing.assert_allclose(uncertain, [0, 0, 0.25, 0])


def test_two_headed_models_gate_themselves_in_the_ensemble():
    """An aux-head model's masks are multiplied by its own label probability (4th place soft gating)."""
    from steelkit.kernel.predict import Ensemble, LoadedModel
    from steelkit.manifest import ModelEntry

    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            masks = torch.full([x.shape[0], 4, x.shape[2], x.shape[3]], 2.0)  # sigmoid(2) = 0.881
            labels = torch.tensor([[-2.0, 0.0, 2.0, 40.0]]).expand(x.shape[0], -1)
            return masks, labels

    entry = ModelEntry(
        name="two",
        file="two.pt",
        sha256="0" * 64,
        size=1,
        kind="segmenter",
        format="torchscript",
        architecture="unet",
        encoder="x",
        fold=0,
        folds=2,
        classes=[1, 2, 3, 4],
        activation="sigmoid4",
        input={"mean": [0.0] * 3, "std": [1.0] * 3, "scale": 1.0},
        train_size=[8, 16],
        val_metric={},
        thresholds={},
        extra={"aux_head": True},
    )
    module = torch.jit.script(TwoHeads())
    ensemble = Ensemble([LoadedModel(entry, module)], "h", torch.device("cpu"))
    probs, labels = ensemble(torch.zeros(2, 1, 8, 16, dtype=torch.uint8))
    expected = torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(torch.tensor([-2.0, 0.0, 2.0, 40.0]))
    torch.testing.assert_close(probs[0, :, 3, 5], expected)
    assert labels is None  # no stand-alone classifier


@pytest.mark.parametrize("gate", ["hard", "soft", "auto"])
def test_classifier_gating_is_searched_on_out_of_fold_predictions(kit, tmp_path, gate):
    report = run_kernel(settings(kit, tmp_path, stages=("oof", "search"), gate=gate, time_limit=600), progress=False)
    assert sorted(report["models"]) == ["kgate-fold0", "kgate-fold1", "ktiny-fold0", "ktiny-fold1"]
    search = report["search"]
    if gate == "auto":
        assert {"none", "hard", "soft"} <= set(search) and search["chosen_gate"] in ("none", "hard", "soft")
        chosen = search[search["chosen_gate"]]
        assert chosen["dice_after"] == max(search[g]["dice_after"] for g in ("none", "hard", "soft"))
    else:
        assert search["chosen_gate"] == gate
    if search["chosen_gate"] == "hard":
        assert search["hard"]["label_source"] == "classifier"
    valid_submission(kit, tmp_path / "submission.csv")


def test_model_weights_weight_the_per_class_mean(kit):
    from steelkit.kernel.predict import Ensemble, load_models
    from steelkit.manifest import load_manifest

    manifest = load_manifest(kit["dist"] / "weights_manifest.json")
    segmenters = [m for m in manifest.models if m.kind == "segmenter"]
    cpu = torch.device("cpu")
    images = torch.randint(0, 255, (2, 1) + SHAPE, dtype=torch.uint8)
    only0, _ = load_models(manifest, segmenters[:1], cpu)
    weighted, _ = load_models(manifest, segmenters, cpu, {"ktiny-fold0": 1.0, "ktiny-fold1": 0.0})
    equal, _ = load_models(manifest, segmenters, cpu)
    alone = Ensemble(only0, "h", cpu)(images)[0]
    torch.testing.assert_close(Ensemble(weighted, "h", cpu)(images)[0], alone)
    mean = Ensemble(equal, "h", cpu)(images)[0]
    second = Ensemble(equal[1:], "h", cpu)(images)[0]
    torch.testing.assert_close(mean, (alone + second) / 2)
