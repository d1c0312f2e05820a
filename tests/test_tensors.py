import cv2
import numpy as np
import pytest
import torch

from steelkit.tensors import TTA_VIEWS, apply_tta, normalize, resize_to, tta_views


@pytest.mark.parametrize("name", sorted(TTA_VIEWS))
def test_tta_of_identity_returns_the_input_exactly(name):
    x = torch.rand(2, 4, 12, 40)
    out = apply_tta(lambda t: t, x, tta_views(name))
    assert torch.equal(out, x) if name == "none" else torch.allclose(out, x, atol=0, rtol=1e-6)


def test_tta_undoes_each_flip():
    x = torch.rand(1, 1, 6, 10)

    # a model that is not flip-invariant: it marks the left half; de-augmenting must put marks back on the left
    def left_half(t):
        out = torch.zeros_like(t)
        out[..., : t.shape[-1] // 2] = 1.0
        return out

    out = apply_tta(left_half, x, tta_views("h"))
    assert torch.allclose(out[..., :5], torch.full((1, 1, 6, 5), 0.5))
    assert torch.allclose(out[..., 5:], torch.full((1, 1, 6, 5), 0.5))
    out = apply_tta(left_half, x, tta_views("v"))  # a vertical flip does not move the left half
    assert torch.equal(out, left_half(x))


def test_unknown_tta_lists_valid_names():
    with pytest.raises(KeyError, match="valid"):
        tta_views("d4")


def test_normalize_expands_grey_to_three_channels():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 2)
    out = normalize(images, (0.5, 0.4, 0.3), (0.5, 0.2, 0.1))
    assert out.shape == (1, 3, 1, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, -2.0, -3.0]))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([1.0, 3.0, 7.0]))


def test_area_resize_matches_cv2_inter_area_at_half_scale():
    image = np.random.default_rng(0).integers(0, 256, (16, 60)).astype(np.float32)
    ours = resize_to(torch.from_numpy(image)[None, None], (8, 30), "area")[0, 0].numpy()
    np.testing.assert_allclose(ours, cv2.resize(image, (30, 8), interpolation=cv2.INTER_AREA), rtol=1e-5)
