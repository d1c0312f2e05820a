"""Shared fixtures: the real Severstal label files (read from ../shared/severstal, never copied into the repo)."""

from pathlib import Path

import pytest

#: where the real label files live in this workspace: <repo>/../shared/severstal
SHARED = Path(__file__).resolve().parents[2] / "shared" / "severstal"


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"real Severstal file {path} is absent (it lives outside the repo, in ../shared/severstal)")
    return path


@pytest.fixture
def real_file():
    return shared_file


def write_easy_competition(root: Path, n_train: int, n_test: int, shape=(64, 256), seed: int = 0) -> Path:
    """A competition folder in the real layout whose defects a tiny model learns in a few dozen steps.

    The synthetic generator (``steelkit synth``) is realistic and therefore slow to learn; kernel tests need models
    that already beat the all-empty prediction, so this writes real grey JPEGs and real CSVs with plain, well separated
    defects: class 1 bright squares, class 2 dark vertical lines, class 3 mid-grey horizontal bands, class 4 large
    pale blobs, on a noisy grey background. About 40 % of images are clean. The hidden test labels are written to
    ``root / "test_labels.csv"``.

    Returns:
        the competition folder ``root / "competition"``.
    """
    import cv2
    import numpy as np
    import pandas as pd

    from steelkit.rle import encode

    rng = np.random.default_rng(seed)
    folder = Path(root) / "competition"
    h, w = shape
    rows = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / f"{split}_images").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image_id = f"{split[:2]}{i:05d}{rng.integers(16**3):03x}.jpg"
            image = rng.normal(90, 6, shape).clip(0, 255)
            masks = np.zeros((4,) + tuple(shape), dtype=np.uint8)
            if rng.random() > 0.4:
                c = int(rng.integers(4))
                y, x = int(rng.integers(0, h - h // 2)), int(rng.integers(0, w - w // 3))
                if c == 0:
                    masks[0, y : y + 10, x : x + 10] = 1
                elif c == 1:
                    masks[1, :, x : x + 4] = 1
                elif c == 2:
                    masks[2, y : y + h // 3, :] = 1
                else:
                    masks[3, y : y + h // 2, x : x + w // 3] = 1
                image[masks[c] > 0] = (230, 20, 150, 190)[c] + rng.normal(0, 5, int(masks[c].sum()))
            grey = image.clip(0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{split}_images" / image_id), cv2.merge([grey] * 3))
            for c in range(4):
                if masks[c].any():
                    rows[split].append((image_id, c + 1, encode(masks[c])))
            if split == "test":
                rows.setdefault("sample", []).extend((image_id, c, "1 1") for c in range(1, 5))
    columns = ["ImageId", "ClassId", "EncodedPixels"]
    pd.DataFrame(rows["train"], columns=columns).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows["sample"], columns=columns).to_csv(folder / "sample_submission.csv", index=False)
    pd.DataFrame(rows["test"], columns=columns).to_csv(Path(root) / "test_labels.csv", index=False)
    return folder


#: tiny and non-square: 64x384 images, trained at half resolution on 32x128 crops
SHAPE = (64, 384)
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"arch": "unet", "encoder": "tu-test_efficientnet", "decoder_channels": [16, 16, 8, 8, 8]},
    "data": {"scale": 0.5, "crops": [[32, 128]], "batch_size": 4, "num_workers": 0, "folds": 2},
    "optim": {"lr": 0.003, "epochs": 2, "steps_per_epoch": 2},
}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A tiny synthetic competition, 2 trained folds, their TorchScript export and the Kaggle dataset folder (shared
    by the end-to-end and the fault tests: build once, copy before changing anything)."""
    from steelkit.config import TrainConfig
    from steelkit.export import export_run
    from steelkit.packaging import build_dataset
    from steelkit.synth import synthesize
    from steelkit.train import train

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
