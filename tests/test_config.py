import pytest

from steelkit.config import TrainConfig, load_config, preset_names
from steelkit.models import ARCHITECTURES, build_segmenter


def test_presets_load_and_are_listed():
    assert "cpu-tiny" in preset_names()
    cfg = load_config("cpu-tiny")
    assert cfg.name == "cpu-tiny" and cfg.model.encoder_weights is None


def test_unknown_preset_lists_the_presets():
    with pytest.raises(KeyError, match="cpu-tiny"):
        load_config("no-such-preset")


@pytest.mark.parametrize(
    "values, error, match",
    [
        ({"modle": {}}, KeyError, "unknown key\\(s\\) \\['modle'\\]; valid keys"),
        ({"data": {"foldz": 3}}, KeyError, "section 'data': unknown key"),
        ({"data": {"scale": 1.5}}, ValueError, "data.scale"),
        ({"data": {"folds": 3, "train_folds": [3]}}, ValueError, "train_folds"),
        ({"data": {"crop_on_mask": 2}}, ValueError, "crop_on_mask"),
        ({"model": {"encoder_weights": "instagram"}}, ValueError, "encoder_weights"),
        ({"optim": {"epochs": 0}}, ValueError, "optim.epochs"),
    ],
)
def test_invalid_configs_are_refused_on_construction(values, error, match):
    with pytest.raises(error, match=match):
        TrainConfig.from_dict(values)


def test_config_round_trips_through_a_dict():
    cfg = load_config("cpu-tiny")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_architecture_lists_valid_names():
    cfg = TrainConfig.from_dict({"model": {"arch": "segformer-xl"}})
    with pytest.raises(KeyError) as err:
        build_segmenter(cfg.model)
    assert all(name in str(err.value) for name in ARCHITECTURES)


def test_the_tiny_preset_builds_a_real_smp_model():
    import torch

    model = build_segmenter(load_config("cpu-tiny").model).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 160))
    assert out.shape == (1, 4, 64, 160)
