"""``bench/gpu.py`` end to end on the CPU with tiny arguments: it runs the kernel's real predict stage and planner."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_and_reports_throughput_and_a_plan(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-W", "ignore", str(SCRIPT), "--device", "cpu", "--images", "4", "--height", "64"]
    command += ["--width", "320", "--batch-size", "2", "--folds", "2", "--tta", "h", "--warmup", "1", "--repeats", "2"]
    command += ["--num-workers", "1", "--out", str(out), "--name", "cpu", "--tmp-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CPU FIGURES" in done.stdout.splitlines()[-1]
    data = json.loads((out / "cpu.json").read_text())
    assert data["precisions"] == ["fp32"] and not data["cuda"]  # fp16 is skipped off CUDA
    assert data["loader"]["images_per_s"] > 0
    assert data["bare"]["fp32"]["images_per_s"] > 0
    predict = data["predict"]["fp32"]
    assert sorted(predict) == ["1", "2"]
    for figures in predict.values():
        assert figures["images_per_s"] > 0 and figures["images"] == 4 and not figures["problems"]
    assert [r["fed"] > 0 for r in data["rows"] if "fed" in r] == [True, True]
    plan = data["planner"]["fp32"]
    assert plan["test_images"] == 5506 and plan["models"] == 2 and plan["views"] == 2
    assert plan["predict_full_s"] > 0 and plan["predict_estimate_s"] > 0 and plan["predict_3_views_s"] > 0
    assert plan["summary"][0].startswith("predict:") and plan["summary"][-1].startswith("write:")
    assert "CPU FIGURES" in (out / "cpu.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("steelkit-gpubench-")] == []  # cleaned up
