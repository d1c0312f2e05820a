import subprocess
import sys

from steelkit.cli import main


def test_presets_command_lists_cpu_tiny(capsys):
    assert main(["presets"]) == 0
    assert "cpu-tiny" in capsys.readouterr().out


def test_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "train.csv"
    assert main(["train", "--config", "no-such-preset", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "steelkit train: error:" in capsys.readouterr().err
    bad.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 2 3\n")
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,EncodedPixels,ClassId\na.jpg,1 1,1\n")
    assert (
        main(["score", str(sample), "--sample", str(sample), "--labels", str(bad), "--height", "4", "--width", "5"])
        == 2
    )
    assert "row 2: image a.jpg, class 1: RLE has an odd number of tokens" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "steelkit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "synth" in result.stdout and "demo" in result.stdout
