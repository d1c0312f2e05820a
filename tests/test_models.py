"""Model registries, builders, TorchScript round trips, the offline imagenet fallback and the output helpers."""

import time
import warnings

import pytest
import torch

from steelkit.config import ModelConfig
from steelkit.models import (
    ARCHITECTURES,
    CLASSIFIERS,
    SEGMENTERS,
    build_classifier,
    build_model,
    build_model_with_info,
    build_segmenter,
    label_probabilities,
    mask_probabilities,
    split_outputs,
)

#: tiny timm encoder (130k parameters): the cheapest way to exercise a whole architecture
TINY = "tu-test_efficientnet"
#: small, non-square batch (H and W multiples of 32)
SHAPE = (2, 3, 64, 160)
#: PAN pools its stride-32 feature three more times: it needs H, W >= 128
SHAPE_OF = {"pan": (2, 3, 128, 160)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine their spinning costs 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(shape=SHAPE, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _segmenter(**values):
    return ModelConfig(**{"arch": "unet", "encoder": TINY, **values})


def _classifier(**values):
    return ModelConfig(**{"kind": "classifier", "arch": "encoder", "encoder": TINY, "head": "multilabel", **values})


def _script_roundtrip(model, x, path):
    """Script ``model`` (eval), save, load and check the loaded model against eager; returns the loaded model."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-4)
    return loaded


def _sum_of_outputs(output):
    masks, labels = split_outputs(output)
    return sum(t.float().mean() for t in (masks, labels) if t is not None)


@pytest.mark.parametrize("arch", sorted(SEGMENTERS))
def test_every_segmenter_maps_images_to_four_mask_channels_and_scripts(arch, tmp_path):
    shape = SHAPE_OF.get(arch, SHAPE)
    model = build_model(_segmenter(arch=arch)).eval()
    x = _batch(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (shape[0], 4, *shape[2:])
    _script_roundtrip(model, x, tmp_path / f"{arch}.pt")


def test_softmax5_gives_five_logits_and_four_probabilities_that_sum_with_background_to_one():
    model = build_model(_segmenter(head="softmax5")).eval()
    with torch.no_grad():
        logits = model(_batch())
    assert logits.shape == (2, 5, 64, 160)
    probs = mask_probabilities(logits, "softmax5")
    assert probs.shape == (2, 4, 64, 160) and probs.dtype == torch.float32
    background = torch.softmax(logits, dim=1)[:, 0]
    torch.testing.assert_close(probs.sum(dim=1) + background, torch.ones(2, 64, 160))


@pytest.mark.parametrize(("classes", "channels"), [((1, 2, 3, 4), 4), ((3,), 1), ((2, 4), 2)])
def test_aux_head_returns_masks_and_one_label_per_class(classes, channels):
    model = build_model(_segmenter(classes=classes, aux_head=True, dropout=0.2)).eval()
    with torch.no_grad():
        out = model(_batch())
    assert isinstance(out, tuple)
    masks, labels = split_outputs(out)
    assert masks.shape == (2, channels, 64, 160) and labels.shape == (2, channels)


def test_per_class_binary_segmenter_has_one_channel():
    model = build_segmenter(_segmenter(classes=(3,))).eval()
    with torch.no_grad():
        assert model(_batch()).shape == (2, 1, 64, 160)


@pytest.mark.parametrize(
    ("arch", "encoder", "head", "classes", "outputs"),
    [
        ("efficientnet", "efficientnet-b0", "binary", (1, 2, 3, 4), 1),
        ("efficientnet", "efficientnet-b0", "multilabel", (1, 2, 3, 4), 4),
        ("encoder", TINY, "binary", (1, 2, 3, 4), 1),
        ("encoder", TINY, "multilabel", (1, 2, 3, 4), 4),
        ("encoder", "resnet18", "multilabel", (2, 4), 2),
    ],
)
def test_classifiers_give_one_logit_per_output(arch, encoder, head, classes, outputs):
    model = build_classifier(_classifier(arch=arch, encoder=encoder, head=head, classes=classes)).eval()
    with torch.no_grad():
        logits = model(_batch())
    assert logits.shape == (2, outputs)
    assert label_probabilities(logits).shape == (2, outputs)


def test_efficientnet_classifier_keeps_efficientnet_pytorch_weights_and_maths():
    from efficientnet_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-b0", num_classes=4, dropout_rate=0.3)
    reference.set_swish(memory_efficient=False)
    model = build_model(_classifier(arch="efficientnet", encoder="efficientnet-b0", dropout=0.3))
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
        # train mode: the same dropout and drop-connect draws
        torch.manual_seed(1)
        expected = reference.train()(x)
        torch.manual_seed(1)
        torch.testing.assert_close(model.train()(x), expected)


#: one model of each kind the kernel may load
KINDS = {
    "sigmoid4-unet": dict(kind="segmenter", arch="unet", encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8)),
    "softmax5-fpn": dict(kind="segmenter", arch="fpn", encoder=TINY, head="softmax5"),
    "aux-unet": dict(kind="segmenter", arch="unet", encoder=TINY, aux_head=True, dropout=0.2),
    "efficientnet": dict(kind="classifier", arch="efficientnet", encoder="efficientnet-b0", head="binary"),
    "encoder": dict(kind="classifier", arch="encoder", encoder="mobilenet_v2", head="multilabel", dropout=0.2),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_scripted_model_matches_eager_and_still_trains(name, tmp_path):
    model = build_model(ModelConfig(**KINDS[name]))
    x = _batch()
    loaded = _script_roundtrip(model, x, tmp_path / f"{name}.pt")

    # BatchNorm follows .train() / .eval(): running statistics move in train mode only
    buffer = next(name for name, _ in loaded.named_buffers() if name.endswith("running_mean"))
    stats = dict(loaded.named_buffers())[buffer]
    before = stats.clone()
    with torch.no_grad():
        loaded.eval()(x)
    torch.testing.assert_close(stats, before, rtol=0, atol=0)
    loaded.train()
    assert loaded.training
    with torch.no_grad():
        loaded(x)
    assert not torch.equal(stats, before)

    # one optimiser step changes the weights
    params = [p for p in loaded.parameters() if p.requires_grad]
    old = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    _sum_of_outputs(loaded(x)).backward()
    optimizer.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, old))


def test_export_script_model_accepts_a_tuple_output_model(tmp_path):
    try:
        from steelkit.export import script_model
    except ImportError as err:  # export.py imports the training stack, which may be mid-edit
        pytest.skip(f"steelkit.export does not import: {err}")
    script_model(build_model(ModelConfig(**KINDS["aux-unet"])), tmp_path / "aux.pt", check_shape=SHAPE)
    assert (tmp_path / "aux.pt").stat().st_size > 0


@pytest.mark.parametrize(("kind", "registry"), [("segmenter", SEGMENTERS), ("classifier", CLASSIFIERS)])
def test_unknown_architecture_lists_the_valid_names_of_its_kind(kind, registry):
    head = "sigmoid4" if kind == "segmenter" else "binary"
    with pytest.raises(KeyError) as err:
        build_model(ModelConfig(kind=kind, arch="segformer-xl", head=head))
    assert "segformer-xl" in str(err.value) and all(name in str(err.value) for name in registry)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (dict(arch="unet", encoder="resnet19"), ["resnet19", "did you mean", "valid: ", "resnet18", "mobilenet_v2"]),
        (dict(kind="classifier", arch="encoder", encoder="resnet19", head="binary"), ["resnet19", "valid: ", "vgg11"]),
        (dict(arch="fpn", encoder="tu-no_such_net"), ["tu-no_such_net", "timm.list_models"]),
        (dict(kind="classifier", arch="efficientnet", encoder="efficientnet-b9", head="binary"), ["efficientnet-b0"]),
    ],
)
def test_unknown_encoder_is_named_with_a_hint(values, expected):
    with pytest.raises(KeyError) as err:
        build_model(ModelConfig(**values))
    assert all(text in str(err.value) for text in expected)


def test_architecture_alias_and_kind_checks():
    assert ARCHITECTURES is SEGMENTERS
    assert "unetplusplus" not in SEGMENTERS  # smp 0.6.0's UnetPlusPlus decoder does not script
    with pytest.raises(ValueError, match="segmenter"):
        build_segmenter(_classifier())
    with pytest.raises(ValueError, match="classifier"):
        build_classifier(_segmenter())


def test_decoder_channels_shape_the_decoder():
    model = build_model(_segmenter(decoder_channels=(32, 16, 16, 8, 8))).eval()
    assert model.segmentation_head[0].in_channels == 8
    with torch.no_grad():
        assert model(_batch()).shape == (2, 4, 64, 160)


@pytest.mark.parametrize(
    ("arch", "channels", "match"),
    [("fpn", (64,), "applies to"), ("unet", (32, 16), "5 widths"), ("deeplabv3plus", (64, 32), "one width")],
)
def test_decoder_channels_are_refused_where_they_do_not_fit(arch, channels, match):
    with pytest.raises(ValueError, match=match):
        build_model(_segmenter(arch=arch, decoder_channels=channels))


@pytest.mark.parametrize(
    "values",
    [
        dict(arch="unet", encoder="resnet18"),
        dict(arch="fpn", encoder=TINY, aux_head=True),
        dict(kind="classifier", arch="efficientnet", encoder="efficientnet-b0", head="binary"),
        dict(kind="classifier", arch="encoder", encoder="mobilenet_v2", head="binary"),
    ],
)
def test_imagenet_falls_back_to_random_weights_offline_without_hanging(values, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # no network and empty caches, whatever this machine has
    monkeypatch.setattr("steelkit.models._reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    cfg = ModelConfig(encoder_weights="imagenet", **values)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="could not be loaded.*random initialisation"):
        model, weights = build_model_with_info(cfg)
    assert time.perf_counter() - start < 10
    assert weights is None
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline
    with torch.no_grad():
        masks, labels = split_outputs(model.eval()(_batch()))
    assert (masks if masks is not None else labels).shape[0] == 2


@pytest.mark.parametrize(("arch", "encoder"), [("linknet", "mit_b0"), ("deeplabv3plus", "densenet121")])
def test_an_invalid_pairing_raises_smp_error_and_no_fallback_warning(arch, encoder, monkeypatch):
    monkeypatch.setattr("steelkit.models._reachable", lambda url, timeout=3.0: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match="not supported|dilated"):
            build_model(_segmenter(arch=arch, encoder=encoder, encoder_weights="imagenet"))


def test_cached_imagenet_weights_load_offline(tmp_path, monkeypatch):
    """The Kaggle case: no network, weights already in the huggingface / torch hub caches."""
    import huggingface_hub.constants
    import segmentation_models_pytorch as smp
    from efficientnet_pytorch import EfficientNet
    from safetensors.torch import save_file

    monkeypatch.setattr("steelkit.models._reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # a fake smp-hub snapshot of resnet18 at the revision smp pins
    pinned = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = tmp_path / "hf" / f"models--{pinned['repo_id'].replace('/', '--')}" / "snapshots" / pinned["revision"]
    snapshot.mkdir(parents=True)
    encoder = smp.encoders.get_encoder("resnet18")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text("{}")
    # a fake efficientnet-pytorch release file in the torch hub cache
    reference = EfficientNet.from_name("efficientnet-b0")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet-b0-355c32eb.pth")

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        unet, unet_weights = build_model_with_info(_segmenter(encoder="resnet18", encoder_weights="imagenet"))
        gate, gate_weights = build_model_with_info(
            _classifier(arch="efficientnet", encoder="efficientnet-b0", head="binary", encoder_weights="imagenet")
        )
    assert unet_weights == gate_weights == "imagenet"
    torch.testing.assert_close(unet.encoder.conv1.weight, encoder.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(gate._conv_stem.weight, reference._conv_stem.weight, rtol=0, atol=0)
    assert gate._fc.out_features == 1


def test_no_weights_requested_means_none_used_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, weights = build_model_with_info(_segmenter())
    assert weights is None


def test_split_outputs_recognises_masks_labels_and_pairs():
    masks, labels = torch.zeros(2, 4, 32, 200), torch.zeros(2, 4)
    assert split_outputs(masks) == (masks, None)
    assert split_outputs(labels) == (None, labels)
    assert split_outputs((masks, labels)) == (masks, labels)
    assert split_outputs([masks, labels]) == (masks, labels)
    for bad in (torch.zeros(2, 4, 32), (masks,), (labels, masks), "masks"):
        with pytest.raises(ValueError):
            split_outputs(bad)


@pytest.mark.parametrize("head", ["sigmoid4", "sigmoid"])
def test_sigmoid_heads_give_independent_float32_probabilities(head):
    logits = torch.tensor([-20.0, 0.0, 20.0], dtype=torch.float16).view(1, 3, 1, 1).expand(1, 3, 32, 200)
    probs = mask_probabilities(logits, head)
    assert probs.dtype == torch.float32 and probs.shape == (1, 3, 32, 200)
    torch.testing.assert_close(probs[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1e-6, rtol=0)


def test_mask_probabilities_refuses_unknown_heads_and_wrong_softmax_channels():
    with pytest.raises(KeyError, match="softmax5"):
        mask_probabilities(torch.zeros(1, 4, 32, 200), "softmax")
    with pytest.raises(ValueError, match="5"):
        mask_probabilities(torch.zeros(1, 4, 32, 200), "softmax5")


def test_label_probabilities_are_float32_sigmoids():
    probs = label_probabilities(torch.tensor([[0.0, 40.0]], dtype=torch.float16))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.5, 1.0]]))


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2", "efficientnet-b0", "tu-efficientnet_b0"])
@pytest.mark.parametrize("arch", sorted(SEGMENTERS))
def test_every_segmenter_scripts_with_common_encoders(arch, encoder, tmp_path):
    model = build_model(ModelConfig(arch=arch, encoder=encoder, aux_head=True))
    _script_roundtrip(model, _batch(SHAPE_OF.get(arch, SHAPE)), tmp_path / "m.pt")
