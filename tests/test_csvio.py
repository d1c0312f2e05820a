import os

import numpy as np
import pandas as pd
import pytest

from steelkit.csvio import (
    format_rows,
    label_statistics,
    read_labels,
    read_rows,
    read_sample_submission,
    read_submission,
    write_submission,
)
from steelkit.rle import encode

from .conftest import shared_file

SHAPE = (8, 30)
A = "3 4 20 2"
B = "100 7"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


OLD_TRAIN = (
    "ImageId_ClassId,EncodedPixels\n"
    + "".join(f"a.jpg_{c},{A if c == 1 else ''}\n" for c in range(1, 5))
    + "".join(f"b.jpg_{c},\n" for c in range(1, 5))
    + "".join(f"c.jpg_{c},{B if c == 3 else ''}\n" for c in range(1, 5))
)
NEW_TRAIN = f"ImageId,ClassId,EncodedPixels\na.jpg,1,{A}\nc.jpg,3,{B}\n"


def test_both_train_layouts_read_to_the_same_masks(tmp_path):
    old = read_labels(write(tmp_path, "old.csv", OLD_TRAIN), SHAPE)
    new = read_labels(write(tmp_path, "new.csv", NEW_TRAIN), SHAPE)
    assert old.layout == "old" and new.layout == "new"
    assert old.as_dict() == new.as_dict() == {("a.jpg", 1): A, ("c.jpg", 3): B}
    assert old.image_ids == ("a.jpg", "b.jpg", "c.jpg")  # the old layout names clean images too
    np.testing.assert_array_equal(
        old.classes_of(["c.jpg", "b.jpg", "a.jpg"]), [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    )


@pytest.mark.parametrize(
    "body, match",
    [
        ("a.jpg,1,1 2 3\n", "row 2: image a.jpg, class 1: RLE has an odd number"),
        ("a.jpg,1,1 2\nb.jpg,2,5 x\n", "row 3: .*not an integer"),
        ("a.jpg,1,239 5\n", "row 2: .*past the image"),
        ("a.jpg,2,10 5 12 2\n", "row 2: .*overlaps"),
        ("a.jpg,5,1 2\n", "row 2: class id '5'"),
        ("a.jpg,1,1 2\na.jpg,1,5 2\n", "row 3: duplicate row for image a.jpg class 1 \\(first at row 2\\)"),
    ],
)
def test_bad_train_rows_name_file_row_and_problem(tmp_path, body, match):
    path = write(tmp_path, "train.csv", "ImageId,ClassId,EncodedPixels\n" + body)
    with pytest.raises(ValueError, match=match) as err:
        read_labels(path, SHAPE)
    assert str(path) in str(err.value)


def test_skip_malformed_rows_counts_them(tmp_path):
    path = write(tmp_path, "train.csv", f"ImageId,ClassId,EncodedPixels\na.jpg,1,{A}\nb.jpg,2,1 2 3\nc.jpg,3,0 4\n")
    labels = read_labels(path, SHAPE, on_error="skip")
    assert labels.skipped == 2 and labels.as_dict() == {("a.jpg", 1): A}


def test_unknown_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unrecognised header"):
        read_rows(write(tmp_path, "x.csv", "Image,Class,Pixels\n"))


NEW_SAMPLE = "ImageId,EncodedPixels,ClassId\n" + "".join(
    f"{i}.jpg,1 1,{c}\n" for i in ("t1", "t0") for c in range(1, 5)
)


@pytest.mark.parametrize("layout", ["old", "new"])
def test_submission_keeps_layout_and_order_and_validates(tmp_path, layout):
    text = (
        NEW_SAMPLE
        if layout == "new"
        else "ImageId_ClassId,EncodedPixels\n"
        + "".join(f"{i}.jpg_{c},1 1\n" for i in ("t1", "t0") for c in range(1, 5))
    )
    sample = read_sample_submission(write(tmp_path, "sample.csv", text))
    assert sample.layout == layout and sample.image_ids == ["t1.jpg", "t0.jpg"]
    out = write_submission(sample, {("t0.jpg", 2): A, ("t1.jpg", 4): B}, tmp_path / "submission.csv", SHAPE)
    lines = out.read_text().splitlines()
    assert lines[0] == text.splitlines()[0]
    assert len(lines) == 9
    frame = read_submission(out, sample, SHAPE)
    assert frame["EncodedPixels"].tolist() == ["", "", "", B, "", A, "", ""]


def test_submission_refuses_bad_rle_and_unknown_pairs_and_writes_nothing(tmp_path):
    sample = read_sample_submission(write(tmp_path, "sample.csv", NEW_SAMPLE))
    out = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match="t0.jpg, class 2: RLE has an odd number"):
        write_submission(sample, {("t0.jpg", 2): "1 2 3"}, out, SHAPE)
    with pytest.raises(ValueError, match="not in"):
        write_submission(sample, {("zz.jpg", 2): A}, out, SHAPE)
    assert not out.exists() and os.listdir(tmp_path) == ["sample.csv"]


def test_read_submission_names_the_first_wrong_row(tmp_path):
    sample = read_sample_submission(write(tmp_path, "sample.csv", NEW_SAMPLE))
    lines = NEW_SAMPLE.splitlines()
    swapped = "\n".join(lines[:2] + [lines[3], lines[2]] + lines[4:]) + "\n"
    with pytest.raises(ValueError, match="row 3 is \\(t1.jpg, 3\\), the sample submission has \\(t1.jpg, 2\\)"):
        read_submission(write(tmp_path, "sub.csv", swapped), sample, SHAPE)
    with pytest.raises(ValueError, match="4 rows, the sample submission has 8"):
        read_submission(write(tmp_path, "short.csv", "\n".join(lines[:5]) + "\n"), sample, SHAPE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_destination_raises_and_leaves_nothing(tmp_path):
    sample = read_sample_submission(write(tmp_path, "sample.csv", NEW_SAMPLE))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(OSError, match="cannot write"):
        write_submission(sample, {}, locked / "submission.csv", SHAPE)
    assert os.listdir(locked) == []


def test_destination_that_cannot_exist_raises_and_leaves_nothing(tmp_path):
    sample = read_sample_submission(write(tmp_path, "sample.csv", NEW_SAMPLE))
    not_a_folder = write(tmp_path, "working", "a file where a folder should be")
    with pytest.raises(OSError, match="cannot write .*working/submission.csv"):
        write_submission(sample, {}, not_a_folder / "submission.csv", SHAPE)
    assert sorted(os.listdir(tmp_path)) == ["sample.csv", "working"]


def test_failed_write_keeps_the_previous_submission(tmp_path):
    sample = read_sample_submission(write(tmp_path, "sample.csv", NEW_SAMPLE))
    out = write_submission(sample, {("t0.jpg", 1): A}, tmp_path / "submission.csv", SHAPE)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_submission(sample, {("t0.jpg", 1): "9999 9"}, out, SHAPE)
    assert out.read_bytes() == before


def test_real_flags_reproduce_the_train_label_statistics():
    flags = pd.read_csv(shared_file("train_image_flags.csv"))
    stats = label_statistics(flags[["1", "2", "3", "4"]].to_numpy())
    assert stats["images"] == 12568
    assert stats["images_per_class"] == {1: 897, 2: 247, 3: 5150, 4: 801}
    assert stats["defective"] == 6666 and stats["clean"] == 5902
    assert stats["images_by_class_count"] == {0: 5902, 1: 6239, 2: 425, 3: 2}
    assert stats["empty_pair_fraction"] == pytest.approx(0.859, abs=1e-3)


def test_real_flags_as_an_old_layout_train_csv(tmp_path):
    """The flags file written as the old 4-rows-per-image train.csv reads back to the same statistics."""
    flags = pd.read_csv(shared_file("train_image_flags.csv"))
    rows = [
        (f"{image_id}_{c}", "1 1" if flag else "")
        for image_id, *values in flags.itertuples(index=False)
        for c, flag in zip(range(1, 5), values)
    ]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=["ImageId_ClassId", "EncodedPixels"]).to_csv(path, index=False)
    labels = read_labels(path)
    stats = label_statistics(labels.classes_of(labels.image_ids))
    assert stats["images_per_class"] == {1: 897, 2: 247, 3: 5150, 4: 801}
    assert stats["images_by_class_count"] == {0: 5902, 1: 6239, 2: 425, 3: 2}


def test_real_public_sample_submission_and_a_written_answer_validates(tmp_path):
    sample = read_sample_submission(shared_file("sample_submission_public.csv"))
    assert sample.layout == "old" and len(sample.frame) == 7204 and len(sample.image_ids) == 1801
    assert sample.keys[:4] == [("004f40c73.jpg", c) for c in range(1, 5)]
    predictions, _, _ = read_rows(shared_file("public_test_predictions_khornlund.csv"))
    answer = {
        (i, c): rle for i, c, rle in predictions[["ImageId", "ClassId", "EncodedPixels"]].itertuples(False) if rle
    }
    assert len(answer) == 92 + 1 + 579 + 110
    out = write_submission(sample, answer, tmp_path / "submission.csv")
    frame = read_submission(out, sample)
    assert dict(zip(zip(frame["ImageId"], frame["ClassId"]), frame["EncodedPixels"])) == {
        **dict.fromkeys(sample.keys, ""),
        **answer,
    }
    # written in the sample's own layout: the same bytes as the real file it came from, up to line endings
    real = shared_file("public_test_predictions_khornlund.csv").read_text().replace("\r\n", "\n")
    assert out.read_text() == real


def test_format_rows_old_layout_keys():
    sample_frame = pd.DataFrame(
        {"ImageId": ["x.jpg"] * 2, "ClassId": [1, 2], "EncodedPixels": ["1 1"] * 2, "row": [2, 3]}
    )
    from steelkit.csvio import SampleSubmission

    sample = SampleSubmission(sample_frame, "old", ("ImageId_ClassId", "EncodedPixels"), "s.csv")
    frame = format_rows(sample, {("x.jpg", 2): encode(np.ones((2, 3)))})
    assert frame.values.tolist() == [["x.jpg_1", ""], ["x.jpg_2", "1 6"]]
