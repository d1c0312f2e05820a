"""bench/speed.py: its reference implementations agree with steelkit, and its quick mode runs end to end."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from steelkit.postprocess import PostProcess, apply_postprocess
from steelkit.rle import decode, encode
from steelkit.search import SearchGrid, search_full

from .conftest import SHARED

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _load_speed()


@pytest.mark.parametrize(
    "shape, density",
    [((32, 200), 0.5), ((32, 200), 0.02), ((30, 202), 0.3), ((7, 13), 0.5), ((1, 24), 0.4), ((256, 1600), 0.001)],
)
def test_reference_rle_agrees_with_steelkit(shape, density):
    """Widths that are and are not multiples of 8 (steelkit's encoder pads those), heights of 1 and not of 8."""
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        mask = rng.random(shape) < density
        rle = encode(mask)
        assert rle == speed.mask2rle(mask)
        ours, theirs = decode(rle, shape), speed.rle2mask(rle, shape[::-1])
        assert theirs.shape == shape
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, mask)


def test_reference_rle_agrees_on_edge_masks():
    shape = (16, 40)
    full, empty = np.ones(shape, dtype=bool), np.zeros(shape, dtype=bool)
    corners = empty.copy()
    corners[0, 0] = corners[-1, -1] = True
    for mask in (full, empty, corners):
        assert encode(mask) == speed.mask2rle(mask)
    assert encode(full) == "1 640" and encode(corners) == "1 1 640 1"


def test_reference_rle_agrees_on_real_strings():
    path = SHARED / "train_real_partial.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    inputs = speed.load_masks(25, np.random.default_rng(0))
    rles = inputs["categories"]["real train masks"]
    assert len(rles) == 25
    for rle in rles:
        mask = decode(rle)
        assert speed.mask2rle(mask) == rle == encode(mask.astype(bool))
        np.testing.assert_array_equal(speed.rle2mask(rle), mask)


def _blobs(shape, rng, n=6):
    """uint8 probability map (x 255) of ``n`` rectangles of different sizes and confidences."""
    p = np.full(shape, 20, dtype=np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(1, 6), rng.integers(1, 12)
        p[y : y + h, x : x + w] = rng.integers(100, 256)
    return p


def test_reference_postprocess_agrees_with_apply_postprocess():
    rng = np.random.default_rng(1)
    shape = (32, 200)
    for _ in range(10):
        probs = np.stack([_blobs(shape, rng) for _ in range(4)])
        probs[0, 2:4, 2:6] = 255  # a component of exactly 8 pixels: the reference keeps only those of more than 8
        floats = probs.astype(np.float32) / np.float32(255.0)
        min_size, min_area = (8, 3, 0, 20), (0, 12, 30, 0)
        settings = PostProcess((0.5,) * 4, min_area=min_area, min_component=tuple(s + 1 for s in min_size))
        ours = apply_postprocess(probs, settings)
        theirs = np.stack([speed.post_process_area(floats[c], 0.5, min_size[c], min_area[c]) for c in range(4)])
        np.testing.assert_array_equal(ours, theirs.astype(bool))
        assert not ours[0, 2:4, 2:6].any()


def _search_case(seed, n=5, shape=(16, 40)):
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 4) + shape, dtype=np.uint8)
    probs = np.zeros_like(truth)
    for i in range(n):
        for c in range(4):
            if rng.random() < 0.6:
                y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 12)
                truth[i, c, y : y + 6, x : x + 12] = 1
            probs[i, c] = np.clip(truth[i, c] * rng.integers(90, 230) + rng.integers(0, 90, shape), 0, 255)
    return probs, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_naive_search_agrees_with_search_full(seed):
    probs, truth = _search_case(seed)
    grid = SearchGrid(
        thresholds=(0.3, 0.5, 0.7), min_components=(0, 8), label_thresholds=(0.0, 0.6), area_fractions=(0, 0.05, 0.1)
    )
    result = search_full(probs, truth, grid, guard=False)
    axes = [r.axes for r in result.classes]
    defaults = [(1, 0, 0, 0)] * 4  # threshold 0.5, no component size, no gate, no area
    assert all(r.axes["threshold"][1] == 0.5 for r in result.classes)
    choices, tables = speed.naive_search(probs, truth, axes, defaults)
    for r, choice, table in zip(result.classes, choices, tables):
        assert r.searched == choice
        np.testing.assert_allclose(r.table, table, rtol=0, atol=1e-9)


def test_naive_search_breaks_ties_towards_the_defaults():
    """All-empty truth and zero probabilities: every cell scores 1, so both keep the defaults' cell."""
    probs = np.zeros((4, 4, 8, 24), dtype=np.uint8)
    truth = np.zeros_like(probs)
    grid = SearchGrid(thresholds=(0.3, 0.5), min_components=(0, 4), label_thresholds=(0.0, 0.5), min_areas=(0, 5))
    result = search_full(probs, truth, grid, guard=False)
    choices, tables = speed.naive_search(probs, truth, [r.axes for r in result.classes], [(1, 0, 0, 0)] * 4)
    expected = {"threshold": 0.5, "min_component": 0.0, "label_threshold": 0.0, "min_area": 0.0}
    for r, choice, table in zip(result.classes, choices, tables):
        assert (table == 1).all()
        assert choice == expected == r.searched


QUICK = ["--quick", "--no-progress", "--repeats", "1", "--overhead-images", "1", "--memory-images", "3"]


def _check_report(out, sections):
    md, js = (out / "speed.md").read_text(), json.loads((out / "speed.json").read_text())
    assert js["mismatches"] == []
    for section in sections:
        assert f"## {section}" in md
    assert {r["operation"] for r in js["rle"]["rows"]} == {"encode", "decode"}
    assert all(r["ratio"] > 0 for r in js["rle"]["rows"] + js["postprocess"]["rows"])
    assert js["search"][0]["same choices"] == "yes" and js["search"][0]["grid"] == "small"
    assert js["overhead"]["total_ms"] > 0 and js["overhead"]["forward"][0]["forward ms per view"] > 0
    return js


def test_quick_mode_runs_end_to_end(tmp_path):
    """Every section but the memory subprocess (its ``memory_child`` runs in this process below)."""
    sections = ["rle", "postprocess", "search", "overhead"]
    assert speed.main(QUICK + ["--sections", *sections, "--out", str(tmp_path)]) == 0
    js = _check_report(tmp_path, ("Goals", "RLE", "Post-processing", "Search", "Kernel work per image"))
    assert "memory" not in js and sorted(js["section_seconds"]) == ["inputs", "jpegs", *sorted(sections)]


def test_memory_child_predicts_through_the_kernel_path(tmp_path):
    from steelkit.synth import synthesize

    synthesize(tmp_path / "competition", 0, 2, 0, progress=False)
    result = speed.memory_child(tmp_path, 2, 0.25, "tu-test_resnet", [16, 16, 8, 8, 8], workers=0)
    assert result["images"] == 2 and (tmp_path / "submission.csv").is_file()
    assert result["cache_bytes"] == 2 * 4 * 128 * 800 and result["float32_bytes"] == 2 * 4 * 256 * 1600 * 4
    assert result["peak_rss_mib"] >= result["rss_before_mib"] > 0


@pytest.mark.slow
def test_quick_mode_with_the_memory_subprocess(tmp_path):
    assert speed.main(QUICK + ["--out", str(tmp_path)]) == 0
    js = _check_report(tmp_path, ("Goals", "Peak memory"))
    assert js["memory"]["images"] == 3 and js["memory"]["peak_rss_mib"] > js["memory"]["cache_bytes"] / 2**20
