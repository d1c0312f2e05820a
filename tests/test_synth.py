"""Tests for steelkit.synth: folder layout, determinism, label statistics, rendering and the real-mask bank."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from steelkit import synth
from steelkit.constants import NEW_SUBMISSION_COLUMNS, NEW_TRAIN_COLUMNS, OLD_COLUMNS
from steelkit.rle import decode, encode

SHARED = Path(__file__).resolve().parents[2] / "shared" / "severstal"
REAL_TRAIN = SHARED / "train_real_partial.csv"
needs_real = pytest.mark.skipif(
    not REAL_TRAIN.exists(), reason=f"real Severstal labels not found at {REAL_TRAIN} (workspace-only data)"
)

#: published mean mask area % per class of the real train masks (dataset-ninja statistics)
REAL_MEAN_AREA_PCT = {1: 1.06, 2: 0.82, 3: 6.22, 4: 8.39}
#: real masks per class in train_real_partial.csv
REAL_PARTIAL_COUNTS = {1: 191, 2: 60, 3: 998, 4: 148}
ID_RE = re.compile(r"^[0-9a-f]{9}\.jpg$")


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _make(root: Path, name: str, **kwargs) -> Path:
    args = {"n_train": 16, "n_test": 5, "seed": 3, "height": 32, "width": 200, "progress": False} | kwargs
    synth.synthesize(root / name, **args)
    return root / name


@pytest.fixture(scope="module")
def comps(tmp_path_factory) -> dict[str, Path]:
    """One small competition per layout: "new" at 32x200, "old" at 64x400."""
    root = tmp_path_factory.mktemp("synth")
    return {
        "new": _make(root, "comp_new", layout="new"),
        "old": _make(root, "comp_old", layout="old", height=64, width=400, seed=4),
    }


SHAPES = {"new": (32, 200), "old": (64, 400)}


# ------------------------------------------------------------------------------------------------ layout
def test_new_layout(comps):
    out = comps["new"]
    train_ids = sorted(p.name for p in (out / "train_images").iterdir())
    test_ids = sorted(p.name for p in (out / "test_images").iterdir())
    assert len(train_ids) == 16 and len(test_ids) == 5
    rows = _rows(out / "train.csv")
    assert tuple(rows[0]) == NEW_TRAIN_COLUMNS
    keys = [(r[0], int(r[1])) for r in rows[1:]]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for image_id, class_id, rle in rows[1:]:
        assert image_id in train_ids and int(class_id) in (1, 2, 3, 4)
        assert decode(rle, SHAPES["new"]).any()  # defective rows only, valid at the image size
    sub = _rows(out / "sample_submission.csv")
    assert tuple(sub[0]) == NEW_SUBMISSION_COLUMNS
    assert sub[1:] == [[i, "1 1", str(c)] for i in test_ids for c in (1, 2, 3, 4)]


def test_old_layout(comps):
    out = comps["old"]
    train_ids = sorted(p.name for p in (out / "train_images").iterdir())
    rows = _rows(out / "train.csv")
    assert tuple(rows[0]) == OLD_COLUMNS
    assert [r[0] for r in rows[1:]] == [f"{i}_{c}" for i in train_ids for c in (1, 2, 3, 4)]
    for _key, rle in rows[1:]:
        decode(rle, SHAPES["old"])  # every row, empty or not, decodes
    assert any(r[1] for r in rows[1:]) and any(not r[1] for r in rows[1:])
    test_ids = sorted(p.name for p in (out / "test_images").iterdir())
    sub = _rows(out / "sample_submission.csv")
    assert tuple(sub[0]) == OLD_COLUMNS
    assert sub[1:] == [[f"{i}_{c}", "1 1"] for i in test_ids for c in (1, 2, 3, 4)]


@pytest.mark.parametrize("layout", ["new", "old"])
def test_hidden_labels_and_summary_beside_out_dir(comps, layout):
    out = comps[layout]
    labels = Path(f"{out}_test_labels.csv")
    assert labels.exists() and not (out / "test_labels.csv").exists()
    assert {p.name for p in out.iterdir()} == {"train_images", "test_images", "train.csv", "sample_submission.csv"}
    rows = _rows(labels)
    assert tuple(rows[0]) == NEW_TRAIN_COLUMNS  # new layout whatever the competition layout
    test_ids = {p.name for p in (out / "test_images").iterdir()}
    for image_id, _, rle in rows[1:]:
        assert image_id in test_ids and decode(rle, SHAPES[layout]).any()
    summary = json.loads(Path(f"{out}_synth.json").read_text())
    assert summary["layout"] == layout and summary["test"]["images"] == 5
    assert summary["test"]["images"] - round(summary["test"]["clean_fraction"] * 5) == len({r[0] for r in rows[1:]})


@pytest.mark.parametrize("layout", ["new", "old"])
def test_jpegs_are_grey_three_channel_with_real_looking_ids(comps, layout):
    out = comps[layout]
    train = {p.name for p in (out / "train_images").iterdir()}
    test = {p.name for p in (out / "test_images").iterdir()}
    assert not train & test
    for name in train | test:
        assert ID_RE.match(name), name
    for path in sorted((out / "train_images").iterdir())[:4] + sorted((out / "test_images").iterdir())[:2]:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (*SHAPES[layout], 3)
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
        assert 20 < img.mean() < 200 and img.std() > 2


def test_labels_path_inside_out_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        synth.synthesize(tmp_path / "c", 2, 1, seed=0, height=32, width=200, labels_path=tmp_path / "c" / "x.csv")


def test_foreign_jpegs_are_not_deleted(tmp_path):
    (tmp_path / "c" / "train_images").mkdir(parents=True)
    (tmp_path / "c" / "train_images" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not from a synthesize run"):
        synth.synthesize(tmp_path / "c", 2, 1, seed=0, height=32, width=200, progress=False)
    assert (tmp_path / "c" / "train_images" / "mine.jpg").exists()


# ------------------------------------------------------------------------------------------- determinism
def _files(out: Path) -> dict[str, bytes]:
    """Bytes of the CSVs, the hidden labels and three JPEGs, keyed by path relative to ``out``."""
    files = [out / "train.csv", out / "sample_submission.csv"]
    files += sorted((out / "train_images").iterdir())[:2] + sorted((out / "test_images").iterdir())[:1]
    found = {str(p.relative_to(out)): p.read_bytes() for p in files}
    return found | {"labels": Path(f"{out}_test_labels.csv").read_bytes()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a, b = _make(tmp_path, "a", n_train=6, n_test=3), _make(tmp_path, "b", n_train=6, n_test=3)
    assert _files(a) == _files(b)
    c = _make(tmp_path, "c", n_train=6, n_test=3, seed=4)
    assert set(_files(a)) != set(_files(c))  # different image ids
    assert _rows(a / "train.csv") != _rows(c / "train.csv")


def test_image_depends_only_on_seed_split_and_index(tmp_path):
    a, b = _make(tmp_path, "a", n_train=3, n_test=2), _make(tmp_path, "b", n_train=5, n_test=2)
    for folder in ("train_images", "test_images"):
        for p in (a / folder).iterdir():
            assert p.read_bytes() == (b / folder / p.name).read_bytes()
    assert len(list((b / "train_images").iterdir())) == 5


def test_train_csv_holds_the_documented_per_image_labels(comps):
    """Image i's labels are ``sample_labels(1, default_rng(SeedSequence(seed).spawn(2)[split].spawn(n)[i]
    .spawn(3)[0]))``: re-drawing them catches a transposed or row-major RLE in the written CSV."""
    seqs = np.random.SeedSequence(4).spawn(2)[0].spawn(16)
    drawn = [synth.sample_labels(1, np.random.default_rng(seq.spawn(3)[0]), 64, 400)[0] for seq in seqs]
    expected = sorted(sorted(encode(m) for m in masks.values()) for masks in drawn)
    by_image: dict[str, list[str]] = {}
    for key, rle in _rows(comps["old"] / "train.csv")[1:]:
        by_image.setdefault(key.rsplit("_", 1)[0], []).extend([rle] if rle else [])
    assert sorted(sorted(v) for v in by_image.values()) == expected


def test_rerun_with_fewer_images_removes_stale_jpegs(tmp_path):
    out = _make(tmp_path, "c", n_train=5, n_test=2)
    _make(tmp_path, "c", n_train=2, n_test=2)
    present = {p.name for p in (out / "train_images").iterdir()}
    assert len(present) == 2
    assert {r[0] for r in _rows(out / "train.csv")[1:]} <= present


# -------------------------------------------------------------------------------------------- statistics
@pytest.fixture(scope="module")
def label_stats() -> dict:
    """Image-level and per-class statistics of 2,400 full-size label draws (in batches, to bound memory)."""
    rng = np.random.default_rng(2024)
    n, clean, multi, overlaps = 2400, 0, 0, 0
    images = dict.fromkeys((1, 2, 3, 4), 0)
    areas: dict[int, list[float]] = {c: [] for c in (1, 2, 3, 4)}
    for _ in range(n // 200):
        for masks in synth.sample_labels(200, rng):
            clean += not masks
            multi += len(masks) > 1
            if len(masks) > 1:
                overlaps += int((sum(m.astype(np.int32) for m in masks.values()) > 1).sum())
            for c, m in masks.items():
                assert m.shape == (256, 1600) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
                images[c] += 1
                areas[c].append(100.0 * m.mean())
    return {"n": n, "clean": clean / n, "multi": multi / n, "images": images, "areas": areas, "overlaps": overlaps}


def test_clean_fraction_and_multi_class(label_stats):
    assert abs(label_stats["clean"] - 0.47) <= 0.03
    assert 0.015 <= label_stats["multi"] <= 0.055  # real: 427 / 12,568 = 3.4%


def test_class_frequency_order(label_stats):
    images = label_stats["images"]
    assert max(images, key=images.get) == 3 and min(images, key=images.get) == 2
    assert images[1] > images[4] > images[2]  # real: 897 / 247 / 5,150 / 801


@pytest.mark.parametrize("class_id", [1, 2, 3, 4])
def test_mean_area_close_to_real(label_stats, class_id):
    mean = float(np.mean(label_stats["areas"][class_id]))
    assert abs(mean / REAL_MEAN_AREA_PCT[class_id] - 1) <= 0.35, mean


def test_class_geometry_ranking(label_stats):
    medians = {c: float(np.median(a)) for c, a in label_stats["areas"].items()}
    assert medians[2] < medians[3] < medians[4] and medians[1] < medians[3]
    a3 = np.array(label_stats["areas"][3])
    assert np.percentile(a3, 90) > 3 * np.median(a3)  # class 3 is very variable (real p90 / p50 = 5.5)


def test_classes_never_overlap(label_stats):
    assert label_stats["overlaps"] == 0


@pytest.mark.parametrize("shape", [(32, 200), (128, 800)])
def test_labels_at_small_non_square_sizes(shape):
    for masks in synth.sample_labels(150, np.random.default_rng(1), *shape):
        total = np.zeros(shape, np.int32)
        for m in masks.values():
            assert m.shape == shape and m.any()
            total += m
        assert total.max(initial=0) <= 1


# --------------------------------------------------------------------------------------------- rendering
def _first_with(class_id: int, shape=(64, 400)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(class_id)
    while True:
        masks = synth.sample_labels(1, rng, *shape)[0]
        if class_id in masks:
            return masks


@pytest.mark.parametrize("class_id", [1, 2, 3, 4])
def test_defects_change_the_image_inside_the_mask(class_id):
    masks = _first_with(class_id)
    kw = {"height": 64, "width": 400, "mark_prob": 0.0, "off_sheet_prob": 0.0}
    with_defect = synth.render_image(masks, np.random.default_rng(7), **kw).astype(int)
    without = synth.render_image({}, np.random.default_rng(7), **kw).astype(int)
    diff = np.abs(with_defect - without)
    union = np.zeros((64, 400), np.uint8)
    for m in masks.values():
        union |= m
    assert diff[masks[class_id] > 0].mean() > 2.0
    far = cv2.dilate(union, np.ones((15, 15), np.uint8)) == 0
    assert diff[far].max(initial=0) <= 1


def test_masks_avoid_dark_off_sheet_region():
    rng = np.random.default_rng(0)
    darks = 0
    for i, masks in enumerate(synth.sample_labels(80, rng, 64, 400)):
        img, info = synth.render_image(masks, np.random.default_rng(i), 64, 400, off_sheet_prob=1.0, return_info=True)
        for m in masks.values():
            assert not (info.off_sheet & (m > 0)).any()
        if info.off_sheet.any():
            darks += 1
            end = 0 if info.off_sheet[:, 0].all() else -1
            assert info.off_sheet[:, end].all() and img[:, end].mean() < 25
    assert darks >= 40


def test_off_sheet_and_mark_rates():
    rng = np.random.default_rng(3)
    n, dark, marked = 400, 0, 0
    for i, masks in enumerate(synth.sample_labels(n, rng, 32, 200)):
        _, info = synth.render_image(masks, np.random.default_rng(i), 32, 200, return_info=True)
        dark += info.off_sheet.any()
        marked += info.n_marks > 0
    assert 0.08 <= dark / n <= 0.22 and 0.12 <= marked / n <= 0.28


def test_unlabelled_marks_on_clean_images_and_outside_masks():
    found = 0
    for i in range(60):
        img, info = synth.render_image({}, np.random.default_rng(i), 64, 400, off_sheet_prob=0.0, return_info=True)
        if info.n_marks:
            found += 1
            plain = synth.render_image({}, np.random.default_rng(i), 64, 400, mark_prob=0.0, off_sheet_prob=0.0)
            diff = np.abs(img.astype(int) - plain)
            assert diff[info.marks].max() >= 4 and diff[~info.marks].max(initial=0) <= 1
    assert 4 <= found <= 24  # ~20% of 60
    for class_id in (1, 3):
        masks = _first_with(class_id)
        for i in range(20):
            _, info = synth.render_image(masks, np.random.default_rng(i), 64, 400, mark_prob=1.0, return_info=True)
            for m in masks.values():
                assert not (info.marks & (m > 0)).any()


# ---------------------------------------------------------------------------------------------- MaskBank
@pytest.fixture(scope="module")
def bank() -> synth.MaskBank:
    if not REAL_TRAIN.exists():
        pytest.skip(f"real Severstal labels not found at {REAL_TRAIN} (workspace-only data)")
    return synth.MaskBank.from_csv(REAL_TRAIN)


@needs_real
def test_bank_loads_every_real_mask(bank):
    assert {c: len(r) for c, r in bank.rles.items()} == REAL_PARTIAL_COUNTS


@needs_real
def test_bank_masks_are_real_masks(bank):
    real = {r for _, c, r in _rows(REAL_TRAIN)[1:] if c == "2"}
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert encode(bank.sample(2, rng, 256, 1600)) in real  # the real strings are canonical
    small = {encode(cv2.resize(decode(r), (400, 64), interpolation=cv2.INTER_NEAREST)) for r in real}
    for _ in range(5):
        assert encode(bank.sample(2, rng, 64, 400)) in small


@needs_real
def test_sample_labels_and_synthesize_with_real_masks(bank, tmp_path):
    real = {encode(cv2.resize(decode(r), (400, 64), interpolation=cv2.INTER_NEAREST)) for r in bank.rles[3]}
    for masks in synth.sample_labels(60, np.random.default_rng(0), 64, 400, mask_source=bank):
        if list(masks) == [3]:
            assert encode(masks[3]) in real
    out = _make(tmp_path, "c", n_train=8, n_test=2, mask_source=str(REAL_TRAIN))
    for _, _, rle in _rows(out / "train.csv")[1:]:
        assert decode(rle, (32, 200)).any()


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


@needs_real
def test_bank_reads_old_layout_and_requires_every_class(tmp_path):
    one = {}
    for image_id, c, rle in _rows(REAL_TRAIN)[1:]:
        one.setdefault(c, (image_id, rle))
    rows = [list(OLD_COLUMNS)] + [[f"{i}_{c}", r] for c, (i, r) in sorted(one.items())] + [["x.jpg_1", ""]]
    loaded = synth.MaskBank.from_csv(_write(tmp_path / "old.csv", rows), 64, 400)
    assert {c: len(r) for c, r in loaded.rles.items()} == dict.fromkeys((1, 2, 3, 4), 1)
    assert loaded.sample(4, np.random.default_rng(0)).shape == (64, 400)
    no_class_2 = _write(tmp_path / "no2.csv", [r for r in rows if not r[0].endswith("_2")])
    with pytest.raises(ValueError, match=r"no2\.csv.*class 2"):
        synth.MaskBank.from_csv(no_class_2)


def test_bank_rejects_bad_header_and_bad_rle(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.csv.*header"):
        synth.MaskBank.from_csv(_write(tmp_path / "bad.csv", [["ImageId", "Class", "Pixels"], ["a.jpg", "1", "1 1"]]))
    rows = [list(NEW_TRAIN_COLUMNS), ["a.jpg", "1", "5 3 1 1"]]
    with pytest.raises(ValueError, match=r"rle\.csv: row 2: image a.jpg, class 1: .*unsorted"):
        synth.MaskBank.from_csv(_write(tmp_path / "rle.csv", rows))
