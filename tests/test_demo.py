"""The README's first command, in process: the whole product on a synthetic competition (slow: minutes)."""

import json

import pytest

from steelkit.demo import run_demo


@pytest.mark.slow
def test_demo_beats_the_all_empty_submission(tmp_path):
    summary = run_demo(tmp_path / "demo")
    assert summary["kernel_outcome"].endswith(" written") and summary["kernel_outcome"] != "all-empty written"
    assert summary["kernel_problems"] == []
    assert summary["network_disabled"]
    assert summary["dice"] > summary["all_empty"]
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["dice"] == summary["dice"]
    assert (tmp_path / "demo" / "test_predictions.png").stat().st_size > 0
