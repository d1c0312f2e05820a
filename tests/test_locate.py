import pytest

from steelkit.kernel.locate import find_competition, find_dataset


def make(root, *paths):
    for path in paths:
        target = root / path
        if path.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")


def test_classic_mounts(tmp_path):
    make(
        tmp_path,
        "severstal-steel-defect-detection/sample_submission.csv",
        "severstal-steel-defect-detection/test_images/",
    )
    make(tmp_path, "my-weights/weights_manifest.json")
    assert find_competition(tmp_path) == tmp_path / "severstal-steel-defect-detection"
    assert find_dataset(tmp_path) == tmp_path / "my-weights"


def test_nested_mounts_are_found_by_marker_not_slug(tmp_path):
    make(tmp_path, "competitions/some-other-name/sample_submission.csv", "competitions/some-other-name/test_images/")
    make(tmp_path, "datasets/owner/weights/versions/3/weights_manifest.json")
    assert find_competition(tmp_path) == tmp_path / "competitions" / "some-other-name"
    assert find_dataset(tmp_path) == tmp_path / "datasets" / "owner" / "weights" / "versions" / "3"


def test_a_sample_without_test_images_is_not_a_competition(tmp_path):
    make(tmp_path, "half/sample_submission.csv", "other/readme.txt")
    with pytest.raises(FileNotFoundError) as err:
        find_competition(tmp_path)
    message = str(err.value)
    assert "no competition folder" in message and "half/" in message and "other/readme.txt" in message
