import cv2
import numpy as np
import pytest

from steelkit.kernel.plan import StageLog
from steelkit.kernel.report import (
    CLASS_COLOURS,
    TRUTH_COLOUR,
    ClassCurves,
    overlay_masks,
    plot_curves,
    plot_stage_timeline,
    write_overlays,
)

#: a non-square tile, so a swapped H/W fails
SHAPE = (32, 200)
GREY = 100


def class_curves(seed: int) -> ClassCurves:
    """Dice over 3 thresholds x 1 component size x 2 label thresholds x 4 areas, chosen at the maximum."""
    rng = np.random.default_rng(seed)
    table = rng.uniform(0.6, 0.9, size=(3, 1, 2, 4))
    chosen = tuple(int(i) for i in np.unravel_index(table.argmax(), table.shape))
    return ClassCurves(
        table=table,
        thresholds=[0.3, 0.5, 0.7],
        min_components=[0],
        label_thresholds=[0.0, 0.6],
        min_areas=[0, 100, 400, 1600],
        chosen=chosen,
        default=(1, 0, 0, 0),
        empty_dice=0.7,
        area_scale=4.0,
    )


def test_plot_curves_writes_one_row_per_class(tmp_path):
    four = plot_curves({f"class {c + 1}": class_curves(c) for c in range(4)}, tmp_path / "four.png")
    two = plot_curves({f"class {c + 1}": class_curves(c) for c in range(2)}, tmp_path / "two.png")
    image, small = cv2.imread(str(four)), cv2.imread(str(two))
    assert image is not None and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] == small.shape[1] and image.shape[0] > 1.5 * small.shape[0]
    with pytest.raises(ValueError):
        plot_curves({}, tmp_path / "none.png")


def test_class_curves_profiles_take_the_best_over_the_other_dimensions():
    table = np.zeros((3, 2, 2, 4))
    table[1, 0, 1, 2] = 0.9
    table[2, 1, 0, 0] = 0.4
    curves = ClassCurves(table, [0.3, 0.5, 0.7], [0, 10], [0.0, 0.5], [0, 5, 10, 20], chosen=(1, 0, 1, 2))
    np.testing.assert_allclose(curves.best_along(0), [0.0, 0.9, 0.4])
    np.testing.assert_allclose(curves.best_along(3), [0.4, 0.0, 0.9, 0.0])
    np.testing.assert_allclose(curves.through(curves.chosen, 0), [0.0, 0.9, 0.0])  # 0.4 lies off the chosen slice
    assert curves.chosen_dice == pytest.approx(0.9)
    with pytest.raises(ValueError, match="shape"):
        ClassCurves(table, [0.3, 0.5], [0, 10], [0.0, 0.5], [0, 5, 10, 20], chosen=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="chosen"):
        ClassCurves(table, [0.3, 0.5, 0.7], [0, 10], [0.0, 0.5], [0, 5, 10, 20], chosen=(3, 0, 0, 0))


def test_overlay_masks_draws_class_coloured_contours_only_on_boundaries():
    image = np.full(SHAPE, GREY, dtype=np.uint8)
    masks = np.zeros((4,) + SHAPE, dtype=bool)
    masks[1, 10:20, 100:150] = True  # class 2
    truth = np.zeros_like(masks)
    truth[0, 5:25, 20:60] = True
    out = overlay_masks(image, masks, truth, title="img")
    assert out.shape == SHAPE + (3,) and out.dtype == np.uint8
    assert tuple(out[10, 120]) == CLASS_COLOURS[1]  # on the top edge of the class-2 mask
    assert tuple(out[15, 149]) == CLASS_COLOURS[1]  # on its right edge
    assert tuple(out[15, 125]) == (GREY,) * 3  # inside: contours are not filled
    assert tuple(out[30, 190]) == (GREY,) * 3  # far away
    assert tuple(out[24, 40]) == TRUTH_COLOUR  # bottom edge of the true class-1 mask
    assert tuple(out[1, 1]) == (0, 0, 0)  # the title's box
    assert (image == GREY).all()  # the input is left alone
    untitled = overlay_masks(image, masks)
    assert tuple(untitled[1, 1]) == (GREY,) * 3 and tuple(untitled[24, 40]) == (GREY,) * 3
    with pytest.raises(ValueError):
        overlay_masks(image, masks[:, :, :100])


def test_write_overlays_stacks_tiles_and_pads_narrow_ones(tmp_path):
    assert write_overlays([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    wide = np.full((32, 200, 3), 50, dtype=np.uint8)
    narrow = np.full((20, 150, 3), 200, dtype=np.uint8)
    path = write_overlays([wide, narrow], tmp_path / "sub" / "overlays.png")
    back = cv2.imread(str(path))
    assert back.shape == (52, 200, 3)
    assert (back[:32] == 50).all() and (back[32:, :150] == 200).all() and (back[32:, 150:] == 0).all()


def test_plot_stage_timeline_accepts_logs_and_their_dicts(tmp_path):
    logs = [
        StageLog("predict", estimated_s=900.0, actual_s=950.0, outcome="done", start_s=20.0),
        StageLog("oof", estimated_s=300.0, actual_s=310.0, outcome="stopped at deadline", start_s=970.0).to_dict(),
        StageLog("pseudo", outcome="dropped", actual_s=0.0, start_s=1280.0),
        StageLog("write", estimated_s=30.0, actual_s=None, outcome="failed: OSError: disk", start_s=1280.0),
    ]
    path = plot_stage_timeline(logs, 3300.0, tmp_path / "timeline.png")
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3 and image.shape[1] > image.shape[0]
