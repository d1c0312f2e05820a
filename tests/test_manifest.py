import copy
import json
from pathlib import Path

import pytest

from steelkit.manifest import (
    MODEL_FIELDS,
    Manifest,
    ModelEntry,
    load_manifest,
    save_manifest,
    sha256_file,
    verify_files,
)

REPO = Path(__file__).resolve().parents[1]


def entry_dict(name, file, sha256, size):
    return {
        "name": name,
        "file": file,
        "sha256": sha256,
        "size": size,
        "kind": "segmenter",
        "format": "torchscript",
        "architecture": "unet",
        "encoder": "resnet18",
        "fold": 0,
        "folds": 5,
        "classes": [1, 2, 3, 4],
        "activation": "sigmoid",
        "input": {"channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3, "scale": 1.0},
        "train_size": [256, 512],
        "val_metric": {"name": "dice", "value": 0.9},
        "thresholds": {"pixel_threshold": [0.5] * 4, "min_area": [0] * 4},
        "epoch": 3,
    }


@pytest.fixture
def folder(tmp_path):
    for i in range(2):
        (tmp_path / f"m{i}.pt").write_bytes(bytes([i]) * (1000 + i))
    models = [
        ModelEntry.from_dict(entry_dict(f"m{i}", f"m{i}.pt", sha256_file(tmp_path / f"m{i}.pt"), 1000 + i), "test")
        for i in range(2)
    ]
    manifest = Manifest(tuple(models), {"pixel_threshold": [0.5] * 4, "min_area": [0] * 4}, {}, (256, 1600), tmp_path)
    save_manifest(manifest)
    return tmp_path


def test_round_trip_keeps_extra_fields(folder):
    manifest = load_manifest(folder / "weights_manifest.json")
    assert [m.name for m in manifest.models] == ["m0", "m1"]
    assert manifest.models[0].extra == {"epoch": 3}
    assert manifest.to_dict()["models"][1] == json.loads((folder / "weights_manifest.json").read_text())["models"][1]


def test_verify_accepts_intact_files_and_names_each_problem(folder):
    manifest = load_manifest(folder / "weights_manifest.json")
    good, problems = verify_files(manifest)
    assert [m.name for m in good] == ["m0", "m1"] and problems == []
    data = bytearray((folder / "m0.pt").read_bytes())
    data[10] ^= 0xFF  # tamper: same size, different content
    (folder / "m0.pt").write_bytes(bytes(data))
    (folder / "m1.pt").write_bytes(b"short")  # truncated
    good, problems = verify_files(manifest)
    assert good == []
    assert "m0.pt: sha256" in problems[0] and "does not match" in problems[0]
    assert "m1.pt: size 5 bytes" in problems[1]
    (folder / "m1.pt").unlink()
    assert "m1.pt: missing" in verify_files(manifest)[1][1]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.pop("models"), "field 'models' must be a list"),
        (lambda d: d["models"][0].pop("sha256"), r"models\[0\] \(m0\): missing field\(s\) \['sha256'\]"),
        (lambda d: d["models"][1].update(fold="1"), r"models\[1\] \(m1\): field 'fold' must be int"),
        (lambda d: d["models"][0].update(kind="detector"), "kind 'detector' is not one of"),
        (lambda d: d["models"][0].update(file="../m0.pt"), "bare file name"),
        (lambda d: d["models"][1].update(name="m0"), "duplicate model names"),
    ],
)
def test_invalid_manifests_are_refused_with_the_field_named(folder, edit, match):
    path = folder / "weights_manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_not_json_is_refused(tmp_path):
    path = tmp_path / "weights_manifest.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(path)


def test_every_required_field_is_checked(folder):
    path = folder / "weights_manifest.json"
    original = json.loads(path.read_text())
    for key in MODEL_FIELDS:
        data = copy.deepcopy(original)
        del data["models"][0][key]
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=key):
            load_manifest(path)


def test_the_repository_template_manifest_is_valid():
    manifest = load_manifest(REPO / "weights_manifest.json")
    assert manifest.models == () and manifest.image_size == (256, 1600)
