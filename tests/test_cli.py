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


def test_presets_command_lists_every_preset_with_its_source(capsys):
    from steelkit.config import load_recipe, preset_names

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out and load_recipe(name).source in out


def test_train_overrides_from_the_command_line(tmp_path, capsys):
    from .conftest import write_easy_competition

    competition = write_easy_competition(tmp_path, 8, 2, (32, 96), seed=1)
    args = ["train", "--config", "cpu-tiny", "--data", str(competition), "--out", str(tmp_path / "runs"), "--quiet"]
    settings = ["optim.epochs=1", "optim.steps_per_epoch=1", "optim.warmup_steps=0", "data.num_workers=0"]
    settings += ["data.batch_size=2", "data.scale=1.0", "data.crops=[[32, 64]]", "data.folds=2", "data.train_folds=[1]"]
    assert main(args + ["--set"] + settings) == 0
    assert (tmp_path / "runs" / "cpu-tiny" / "fold1" / "final.pt").exists()
    assert not (tmp_path / "runs" / "cpu-tiny" / "fold0").exists()
    assert main(args + ["--set", "optim.epoks=1"]) == 2
    assert "unknown key(s) ['epoks']" in capsys.readouterr().err
