"""bench/quality.py end to end with tiny arguments, as a user runs it (slow: about 90 s on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from steelkit.metric import score_pairs

ROOT = Path(__file__).resolve().parents[1]
#: the rows bench/quality.py reports, in order
ROWS = [
    "all_empty",
    "single_fold",
    "flip_tta",
    "fold_ensemble",
    "manifest_postprocess",
    "kernel_search",
    "classifier_gating",
    "pseudo_labels",
    "weight_averaging",
    "full_kernel",
]
N_TEST = 10


@pytest.mark.slow
def test_quality_bench_reports_every_row_and_the_true_all_empty_score(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--seeds", "0", "--n-train", "32"]
    command += ["--n-test", str(N_TEST), "--image-size", "128x800", "--epochs", "1", "--kernel-time-limit", "30"]
    command += ["--out", str(out), "--name", "q", "--workdir", str(work), "--keep"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads((out / "q.json").read_text())
    assert [row["key"] for row in data["rows"]] == ROWS
    (seed,) = data["seeds"]
    assert list(seed["rows"]) == ROWS
    for row in data["rows"]:
        assert all(0.0 <= row["dice"][k] <= 1.0 for k in ("mean", "min", "max")), row
        assert all(0.0 <= row["per_class"][c]["mean"] <= 1.0 for c in "1234"), row
        assert row["verdict"].split(";")[0] in ("baseline", "pays", "DOES NOT PAY"), row["verdict"]
    for key, row in seed["rows"].items():
        assert 0.0 <= row["dice"] <= 1.0 and row["n_pairs"] == 4 * N_TEST, key
    assert data["rows"][1]["delta"]["mean"] == pytest.approx(
        seed["rows"]["single_fold"]["dice"] - seed["rows"]["all_empty"]["dice"]
    )

    # the all-empty row against an empty prediction scored from the hidden labels directly
    labels = pd.read_csv(work / "seed0" / "competition_test_labels.csv").dropna(subset=["EncodedPixels"])
    sample = pd.read_csv(work / "seed0" / "competition" / "sample_submission.csv")
    truth = dict(zip(zip(labels["ImageId"], labels["ClassId"]), labels["EncodedPixels"]))
    pairs = list(zip(sample["ImageId"], sample["ClassId"]))
    empty = score_pairs([""] * len(pairs), [truth.get(p, "") for p in pairs], [c for _, c in pairs], (128, 800))
    assert len(pairs) == 4 * N_TEST
    assert seed["rows"]["all_empty"]["dice"] == pytest.approx(1.0 - len(labels) / len(pairs), abs=1e-12)
    assert seed["rows"]["all_empty"]["dice"] == pytest.approx(empty.mean, abs=1e-12)
    for c in "1234":
        assert seed["rows"]["all_empty"]["per_class"][c] == pytest.approx(empty.per_class[int(c)], abs=1e-12)

    page = (out / "q.md").read_text()
    assert "full kernel" in page and "Per class" in page and "Timings per seed" in page
    assert (out / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert "[quality seed 0] done:" in result.stdout
