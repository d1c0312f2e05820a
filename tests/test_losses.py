"""Losses against values computed by hand from their definitions.

Tiny logit maps use two logits whose sigmoid/softmax is exact: ``sigmoid(0) = 1/2`` and ``sigmoid(ln 3) = 3/4``;
a softmax over 5 channels of ``[0, 0, 0, 0, 0]`` is ``1/5`` each, of ``[ln 2, 0, 0, 0, 0]`` is ``[2/6, 1/6, ...]``.
"""

from math import log

import pytest
import torch

from steelkit.config import MODEL_HEADS, LossConfig, LossTerm, ModelConfig
from steelkit.losses import (
    LOSS_HEADS,
    LOSS_PARAMS,
    LOSSES,
    BCEDiceLoss,
    LossSchedule,
    WeightedLoss,
    bce_dice_loss,
    bce_loss,
    build_loss,
    cce_loss,
    check_loss,
    focal_loss,
    losses_for_head,
    lovasz_hinge_loss,
    soft_dice_loss,
    softmax_dice_loss,
    softmax_to_classes,
    tversky_loss,
)

LN3 = log(3.0)  # sigmoid(LN3) = 3 / (3 + 1) = 3/4


def t(values, shape=None) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float32)
    return x if shape is None else x.reshape(shape)


def close(value: torch.Tensor, expected: float) -> None:
    assert value.dtype == torch.float32 and value.ndim == 0
    torch.testing.assert_close(value, torch.tensor(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bce
@pytest.mark.parametrize(
    "logits, target, pos_weight, expected",
    [
        # (1, 2, 1, 3) all logits 0: every element costs log 2, positives times pos_weight of their channel.
        # channel 0 target [1, 0, 0] with w=2 -> 2 + 1 + 1; channel 1 target [1, 1, 0] with w=3 -> 3 + 3 + 1.
        # C=2 != W=3: a pos_weight broadcast along the last dimension would fail.
        (t([0.0] * 6, (1, 2, 1, 3)), t([1, 0, 0, 1, 1, 0], (1, 2, 1, 3)), (2.0, 3.0), (4 + 7) / 6 * log(2)),
        (t([0.0] * 6, (1, 2, 1, 3)), t([1, 0, 0, 1, 1, 0], (1, 2, 1, 3)), None, log(2)),
        # classifier (N, L) = (1, 2), logits ln 3 (p = 3/4), target [1, 0], pos_weight (2, 1):
        # 2 * -log(3/4) and -log(1/4)
        (t([[LN3, LN3]]), t([[1, 0]]), (2.0, 1.0), (2 * log(4 / 3) + log(4)) / 2),
        # binary classifier (2, 1): positives weighted 5, one positive one negative at p = 3/4
        (t([[LN3], [LN3]]), t([[1], [0]]), (5.0,), (5 * log(4 / 3) + log(4)) / 2),
    ],
)
def test_bce_with_pos_weight(logits, target, pos_weight, expected):
    close(bce_loss(logits, target, pos_weight), expected)


def test_bce_pos_weight_length_is_checked():
    with pytest.raises(ValueError, match="needs 2 values"):
        bce_loss(torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3, 5), pos_weight=(1.0, 2.0, 3.0))


# ---------------------------------------------------------------- dice
# p = 3/4 everywhere on (1, 2, 1, 2), eps = 1:
#   class 0 target [1, 1]: inter 3/2, sum(p) + sum(t) = 3/2 + 2 -> 1 - (3 + 1) / (7/2 + 1) = 1/9
#   class 1 target [1, 0]: inter 3/4, 3/2 + 1                   -> 1 - (3/2 + 1) / (5/2 + 1) = 2/7
DICE_LOGITS = t([LN3] * 4, (1, 2, 1, 2))


@pytest.mark.parametrize(
    "target, class_weights, expected",
    [
        (t([1, 1, 1, 0], (1, 2, 1, 2)), None, (1 / 9 + 2 / 7) / 2),
        (t([1, 1, 1, 0], (1, 2, 1, 2)), (1.0, 3.0), (1 * 1 / 9 + 3 * 2 / 7) / (1 + 3)),
        # class 1 absent from the batch: left out of the mean, whatever its weight
        (t([1, 1, 0, 0], (1, 2, 1, 2)), None, 1 / 9),
        (t([1, 1, 0, 0], (1, 2, 1, 2)), (1.0, 3.0), 1 / 9),
        # class 0 absent: only class 1 counts
        (t([0, 0, 1, 0], (1, 2, 1, 2)), (1.0, 3.0), 2 / 7),
    ],
)
def test_soft_dice_exact(target, class_weights, expected):
    close(soft_dice_loss(DICE_LOGITS, target, class_weights=class_weights), expected)


def test_soft_dice_pools_the_batch():
    # (2, 1, 1, 2), p = 3/4: image 0 target [1, 1], image 1 empty. Pooled: inter 3/2, sum(p) 3, sum(t) 2
    # -> 1 - (3 + 1) / (5 + 1) = 1/3 (a per-image mean would give (1/9 + 0) / 2 or count the empty image)
    target = t([1, 1, 0, 0], (2, 1, 1, 2))
    close(soft_dice_loss(t([LN3] * 4, (2, 1, 1, 2)), target), 1 / 3)


@pytest.mark.parametrize("fn", [soft_dice_loss, tversky_loss, softmax_dice_loss])
def test_no_class_present_gives_a_zero_with_a_gradient(fn):
    channels = 5 if fn is softmax_dice_loss else 4
    logits = torch.randn(2, channels, 3, 7, requires_grad=True)
    loss = fn(logits, torch.zeros(2, 4, 3, 7))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- tversky
# (1, 1, 1, 4), eps = 1.
# FP-heavy: p = 3/4 everywhere, target [1, 0, 0, 0]: TP = 3/4, FP = 3 * 3/4 = 9/4, FN = 1/4
# FN-heavy: p = 1/4 everywhere, target [1, 1, 1, 0]: TP = 3/4, FP = 1/4,         FN = 3 * 3/4 = 9/4
FP_HEAVY = (t([LN3] * 4, (1, 1, 1, 4)), t([1, 0, 0, 0], (1, 1, 1, 4)))
FN_HEAVY = (t([-LN3] * 4, (1, 1, 1, 4)), t([1, 1, 1, 0], (1, 1, 1, 4)))


@pytest.mark.parametrize(
    "case, alpha, expected",
    [
        (FP_HEAVY, 0.3, 1 - (3 / 4 + 1) / (3 / 4 + 0.3 * 9 / 4 + 0.7 * 1 / 4 + 1)),  # 1 - 1.75 / 2.6
        (FP_HEAVY, 0.7, 1 - (3 / 4 + 1) / (3 / 4 + 0.7 * 9 / 4 + 0.3 * 1 / 4 + 1)),  # 1 - 1.75 / 3.4
        (FN_HEAVY, 0.3, 1 - (3 / 4 + 1) / (3 / 4 + 0.3 * 1 / 4 + 0.7 * 9 / 4 + 1)),  # 1 - 1.75 / 3.4
        (FN_HEAVY, 0.7, 1 - (3 / 4 + 1) / (3 / 4 + 0.7 * 1 / 4 + 0.3 * 9 / 4 + 1)),  # 1 - 1.75 / 2.6
    ],
)
def test_tversky_exact(case, alpha, expected):
    close(tversky_loss(*case, alpha=alpha), expected)


def test_tversky_alpha_trades_false_positives_for_false_negatives():
    # alpha = 0.3 (recall) forgives false positives and punishes misses; alpha = 0.7 the reverse
    assert tversky_loss(*FP_HEAVY, alpha=0.3) < tversky_loss(*FP_HEAVY, alpha=0.7)
    assert tversky_loss(*FN_HEAVY, alpha=0.3) > tversky_loss(*FN_HEAVY, alpha=0.7)


def test_tversky_half_is_dice_with_double_smoothing():
    # TP + (FP + FN) / 2 = (sum p + sum t) / 2, so alpha = 1/2 is soft Dice with eps doubled
    logits, target = torch.randn(2, 4, 3, 7), (torch.rand(2, 4, 3, 7) > 0.6).float()
    torch.testing.assert_close(
        tversky_loss(logits, target, alpha=0.5, eps=1.0), soft_dice_loss(logits, target, eps=2.0)
    )


# ---------------------------------------------------------------- focal
@pytest.mark.parametrize(
    "gamma, expected",
    [
        # p = 3/4, target [1, 0]: p_t = 3/4 then 1/4; gamma = 0 is BCE
        (0.0, (log(4 / 3) + log(4)) / 2),
        # (1 - 3/4)^2 * -log(3/4) and (1 - 1/4)^2 * -log(1/4)
        (2.0, ((1 / 4) ** 2 * log(4 / 3) + (3 / 4) ** 2 * log(4)) / 2),
    ],
)
def test_focal_exact(gamma, expected):
    close(focal_loss(t([[LN3, LN3]]), t([[1, 0]]), gamma=gamma), expected)


def test_focal_gamma_zero_is_bce():
    logits, target = torch.randn(2, 4, 3, 7), (torch.rand(2, 4, 3, 7) > 0.5).float()
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), bce_loss(logits, target))


# ---------------------------------------------------------------- lovasz
# One map of 3 pixels a, b, c: logits [2, -0.5, 0], target [1, 1, 0]; errors 1 - logit * sign = [-1, 1.5, 1].
# Sorted by error: b (1.5), c (1), a (-1). Jaccard loss of the prediction when the first k sorted pixels are wrong
# (gt = {a, b}): {b} wrong -> pred {a}: 1 - 1/2 = 1/2; {b, c} -> pred {a, c}: 1 - 1/3 = 2/3; all -> pred {c}: 1.
#   L = 1.5 * 1/2 + 1 * (2/3 - 1/2) + relu(-1) * (1 - 2/3) = 11/12
# Complement: logits [-2, 0.5, 0], gt = {c}, same errors and order; background pixels wrong are false positives:
#   {b} -> pred {b, c}: 1 - 1/2 = 1/2; {b, c} -> pred {b}: 1; all -> pred {a, b}: 1.
#   L' = 1.5 * 1/2 + 1 * (1 - 1/2) + 0 = 5/4;  symmetric = (11/12 + 5/4) / 2 = 13/12
LOVASZ_LOGITS = t([2.0, -0.5, 0.0], (1, 1, 1, 3))
LOVASZ_TARGET = t([1, 1, 0], (1, 1, 1, 3))
# a map right with margin 1 (errors <= 0): loss 0
PERFECT_LOGITS = t([1.0, 3.0, -1.0], (1, 1, 1, 3))


@pytest.mark.parametrize(
    "logits, target, symmetric, expected",
    [
        (LOVASZ_LOGITS, LOVASZ_TARGET, False, 11 / 12),
        (LOVASZ_LOGITS, LOVASZ_TARGET, True, 13 / 12),
        (PERFECT_LOGITS, LOVASZ_TARGET, False, 0.0),
        (PERFECT_LOGITS, LOVASZ_TARGET, True, 0.0),
        # right signs but inside the margin: errors [1/2, 1/2, 1/2] -> every sorted increment times 1/2, and the
        # increments sum to the Jaccard loss of all wrong (1): 1/2
        (t([0.5, 0.5, -0.5], (1, 1, 1, 3)), LOVASZ_TARGET, False, 0.5),
        # two maps (N=2, C=1): the example and a perfect one, mean over maps
        (torch.cat([LOVASZ_LOGITS, PERFECT_LOGITS]), torch.cat([LOVASZ_TARGET, LOVASZ_TARGET]), False, 11 / 24),
        # an empty map: gt = {}, any wrong pixel gives Jaccard loss 1, so L = relu(largest error);
        # logits [-2, 0.5, -1] -> errors [-1, 1.5, 0]: 1.5
        (t([-2.0, 0.5, -1.0], (1, 1, 1, 3)), t([0, 0, 0], (1, 1, 1, 3)), False, 1.5),
    ],
)
def test_lovasz_exact(logits, target, symmetric, expected):
    close(lovasz_hinge_loss(logits, target, symmetric=symmetric), expected)


def test_lovasz_is_per_image_and_class():
    # the example as class 1 of image 0 and a perfect map everywhere else: one map of N * C = 2 * 3 is 11/12
    logits, target = PERFECT_LOGITS.repeat(2, 3, 1, 1), LOVASZ_TARGET.repeat(2, 3, 1, 1)
    logits[0, 1] = LOVASZ_LOGITS[0, 0]
    close(lovasz_hinge_loss(logits, target, symmetric=False), 11 / 12 / 6)


# ---------------------------------------------------------------- softmax5 head
# (1, 5, 1, 2): pixel 0 logits all 0 -> softmax 1/5 each; pixel 1 logits [ln 2, 0, 0, 0, 0] -> [2/6, 1/6, ...].
SOFTMAX_LOGITS = torch.stack([t([0.0, 0.0, 0.0, 0.0, 0.0]), t([log(2.0), 0.0, 0.0, 0.0, 0.0])], dim=-1)[None, :, None]
# pixel 0 is class 2, pixel 1 background / class 4
TARGET_2_BG = t([[0, 0], [1, 0], [0, 0], [0, 0]])[None, :, None]
TARGET_2_4 = t([[0, 0], [1, 0], [0, 0], [0, 1]])[None, :, None]


@pytest.mark.parametrize(
    "target, class_weights, expected",
    [
        # -log(1/5) for class 2 at pixel 0, -log(2/6) for background at pixel 1
        (TARGET_2_BG, None, (log(5) + log(3)) / 2),
        # class 2 weighs 4, background 1: weighted mean (4 * log 5 + 1 * log 3) / (4 + 1)
        (TARGET_2_BG, (1.0, 4.0, 1.0, 1.0), (4 * log(5) + log(3)) / 5),
        # class 4 at pixel 1: -log(1/6), weighted 3
        (TARGET_2_4, (1.0, 4.0, 1.0, 3.0), (4 * log(5) + 3 * log(6)) / 7),
    ],
)
def test_cce_exact(target, class_weights, expected):
    close(cce_loss(SOFTMAX_LOGITS, target, class_weights), expected)


# softmax dice, eps = 1; class probabilities are 1/5 at pixel 0 and 1/6 at pixel 1, sum over pixels 11/30:
#   class 2 (target pixel 0): inter 1/5 -> 1 - (2/5 + 1) / (11/30 + 1 + 1) = 1 - 42/71 = 29/71
#   class 4 (target pixel 1): inter 1/6 -> 1 - (2/6 + 1) / (11/30 + 1 + 1) = 1 - 40/71 = 31/71
@pytest.mark.parametrize(
    "target, class_weights, expected",
    [
        (TARGET_2_BG, None, 29 / 71),  # classes 1, 3, 4 absent
        (TARGET_2_4, None, (29 / 71 + 31 / 71) / 2),
        (TARGET_2_4, (1.0, 2.0, 1.0, 3.0), (2 * 29 / 71 + 3 * 31 / 71) / (2 + 3)),
    ],
)
def test_softmax_dice_exact(target, class_weights, expected):
    close(softmax_dice_loss(SOFTMAX_LOGITS, target, class_weights), expected)


def test_softmax_to_classes():
    probs = softmax_to_classes(SOFTMAX_LOGITS)
    assert probs.shape == (1, 4, 1, 2)
    torch.testing.assert_close(probs[0, :, 0, 0], torch.full((4,), 1 / 5))
    torch.testing.assert_close(probs[0, :, 0, 1], torch.full((4,), 1 / 6))
    logits = torch.randn(2, 5, 3, 7)
    background = torch.softmax(logits, dim=1)[:, 0]
    torch.testing.assert_close(softmax_to_classes(logits).sum(1) + background, torch.ones(2, 3, 7))


# ---------------------------------------------------------------- every loss
def _batch(name: str, head: str = "sigmoid4") -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits for the loss's head and a non-overlapping one-hot target of 4 classes, (2, ., 8, 20)."""
    gen = torch.Generator().manual_seed(0)
    if head in ("binary", "multilabel"):
        width = 1 if head == "binary" else 4
        return torch.randn(6, width, generator=gen), (torch.rand(6, width, generator=gen) > 0.5).float()
    index = torch.randint(0, 5, (2, 8, 20), generator=gen)  # 0 = background
    target = torch.stack([(index == c).float() for c in range(1, 5)], dim=1)
    channels = 5 if head == "softmax5" else 4
    return torch.randn(2, channels, 8, 20, generator=gen), target


HEAD_CASES = [(name, head) for name, heads in LOSS_HEADS.items() for head in heads]


@pytest.mark.parametrize("name, head", HEAD_CASES)
def test_gradients_flow(name, head):
    logits, target = _batch(name, head)
    logits.requires_grad_(True)
    loss = LOSSES[name](logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name, head", HEAD_CASES)
def test_float32_under_autocast(name, head):
    logits, target = _batch(name, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](logits.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, LOSSES[name](logits.bfloat16().float(), target))


def test_registries_agree():
    assert set(LOSSES) == set(LOSS_HEADS) == set(LOSS_PARAMS)
    heads = {h for hs in MODEL_HEADS.values() for h in hs}
    assert {h for hs in LOSS_HEADS.values() for h in hs} == heads
    assert losses_for_head("softmax5") == ("cce", "softmax_dice")
    assert losses_for_head("binary") == ("bce", "focal")
    fields = set(LossTerm.__dataclass_fields__)
    assert all(set(params) <= fields for params in LOSS_PARAMS.values())


# ---------------------------------------------------------------- modules
def test_weighted_loss_is_the_weighted_sum():
    terms = (
        LossTerm("bce", weight=0.75, pos_weight=(1.0, 2.0, 3.0, 4.0)),
        LossTerm("dice", weight=0.25, class_weights=(2.0, 2.5, 1.0, 2.0)),
        LossTerm("tversky", weight=2.0, alpha=0.3),
        LossTerm("focal", weight=0.5, gamma=1.0),
        LossTerm("lovasz", weight=1.5),
        LossTerm("dice", weight=1.0),
    )
    logits, target = _batch("bce")
    loss = WeightedLoss(terms)
    parts = [
        bce_loss(logits, target, pos_weight=(1.0, 2.0, 3.0, 4.0)),
        soft_dice_loss(logits, target, class_weights=(2.0, 2.5, 1.0, 2.0)),
        tversky_loss(logits, target, alpha=0.3),
        focal_loss(logits, target, gamma=1.0),
        lovasz_hinge_loss(logits, target),
        soft_dice_loss(logits, target),
    ]
    expected = 0.75 * parts[0] + 0.25 * parts[1] + 2.0 * parts[2] + 0.5 * parts[3] + 1.5 * parts[4] + parts[5]
    torch.testing.assert_close(loss(logits, target), expected)
    assert loss.terms == terms
    breakdown = loss.terms_breakdown(logits, target)
    assert list(breakdown) == ["bce", "dice_1", "tversky", "focal", "lovasz", "dice_5"]
    assert list(breakdown.values()) == pytest.approx([p.item() for p in parts])


def test_weighted_loss_softmax5_head():
    logits, target = _batch("cce", "softmax5")
    loss = WeightedLoss((LossTerm("cce", class_weights=(2.0, 2.5, 1.0, 2.0)), LossTerm("softmax_dice", weight=0.5)))
    expected = cce_loss(logits, target, (2.0, 2.5, 1.0, 2.0)) + 0.5 * softmax_dice_loss(logits, target)
    torch.testing.assert_close(loss(logits, target), expected)


def test_bce_dice_compatibility():
    logits, target = _batch("bce")
    expected = 0.3 * bce_loss(logits, target) + 0.7 * soft_dice_loss(logits, target)
    torch.testing.assert_close(bce_dice_loss(logits, target, 0.3, 0.7), expected)
    torch.testing.assert_close(BCEDiceLoss(0.3, 0.7)(logits, target), expected)


SCHEDULE = {
    "stages": [
        {"start_epoch": 0, "terms": [{"name": "bce"}, {"name": "dice"}]},
        {"start_epoch": 2, "terms": [{"name": "tversky", "alpha": 0.3}]},
    ]
}


@pytest.mark.parametrize(
    "epoch, stage, names",
    [(0, 0, ("bce", "dice")), (1, 0, ("bce", "dice")), (2, 1, ("tversky",)), (9, 1, ("tversky",))],
)
def test_loss_schedule_switches_at_start_epoch(epoch, stage, names):
    schedule = build_loss(LossConfig.from_dict(SCHEDULE), ModelConfig(kind="segmenter", head="sigmoid4"))
    assert isinstance(schedule, LossSchedule) and len(schedule) == 2
    assert schedule.stage_index(epoch) == stage
    assert tuple(t.name for t in schedule.at(epoch).terms) == names
    logits, target = _batch("bce")
    expected = (
        bce_loss(logits, target) + soft_dice_loss(logits, target) if stage == 0 else tversky_loss(logits, target, 0.3)
    )
    torch.testing.assert_close(schedule.at(epoch)(logits, target), expected)


def test_default_loss_config_builds():
    schedule = build_loss(LossConfig(), ModelConfig())
    assert [t.name for t in schedule.at(0).terms] == ["bce", "dice"]


# ---------------------------------------------------------------- check_loss
SIGMOID4 = ModelConfig(kind="segmenter", head="sigmoid4")
SOFTMAX5 = ModelConfig(kind="segmenter", head="softmax5")
BINARY = ModelConfig(kind="classifier", arch="encoder", head="binary")
MULTILABEL = ModelConfig(kind="classifier", arch="encoder", head="multilabel")
CLASS3 = ModelConfig(kind="segmenter", head="sigmoid4", classes=(3,))


@pytest.mark.parametrize(
    "term, model",
    [
        (LossTerm("bce", pos_weight=(1.0, 2.0, 3.0, 4.0)), SIGMOID4),
        (LossTerm("bce", pos_weight=(2.0,)), CLASS3),
        (LossTerm("bce", pos_weight=(2.0,)), BINARY),
        (LossTerm("focal", gamma=0.0), MULTILABEL),
        (LossTerm("dice", class_weights=(2.0, 2.5, 1.0, 2.0)), SIGMOID4),
        (LossTerm("tversky", alpha=0.3), SIGMOID4),
        (LossTerm("lovasz"), CLASS3),
        (LossTerm("cce", class_weights=(2.0, 2.5, 1.0, 2.0)), SOFTMAX5),
        (LossTerm("softmax_dice"), SOFTMAX5),
        (LossTerm("dice", pos_weight=(1.0,)), SIGMOID4),  # a parameter the loss does not use is ignored
    ],
)
def test_check_loss_accepts(term, model):
    check_loss(term, model, "loss stage 0")


@pytest.mark.parametrize(
    "term, model, error, match",
    [
        (
            LossTerm("jaccard"),
            SIGMOID4,
            KeyError,
            r"loss stage 0: unknown loss 'jaccard'; valid losses: \['bce', 'cce'",
        ),
        (
            LossTerm("cce"),
            SIGMOID4,
            ValueError,
            r"'cce' does not fit a sigmoid4 head; valid .*\['bce', 'dice', 'tversky'",
        ),
        (
            LossTerm("dice"),
            BINARY,
            ValueError,
            r"'dice' does not fit a binary head; valid losses for binary: \['bce', 'focal'\]",
        ),
        (LossTerm("bce"), SOFTMAX5, ValueError, r"valid losses for softmax5: \['cce', 'softmax_dice'\]"),
        (LossTerm("bce", pos_weight=(1.0, 2.0)), SIGMOID4, ValueError, "pos_weight needs 4 values .* got 2"),
        (LossTerm("bce", pos_weight=(1.0, 2.0, 3.0, 4.0)), BINARY, ValueError, "pos_weight needs 1 values"),
        (LossTerm("bce", pos_weight=(1.0, 2.0, 3.0, 4.0)), CLASS3, ValueError, "pos_weight needs 1 values"),
        (LossTerm("bce", pos_weight=(1.0, -2.0, 3.0, 4.0)), SIGMOID4, ValueError, "pos_weight must be > 0"),
        (LossTerm("cce", class_weights=(1.0, 2.0, 3.0)), SOFTMAX5, ValueError, "class_weights needs 4 values"),
        (LossTerm("dice", class_weights=(1.0, 2.0)), SIGMOID4, ValueError, "class_weights needs 4 values"),
        (LossTerm("tversky", alpha=1.0), SIGMOID4, ValueError, r"alpha .* must be in \(0, 1\)"),
        (LossTerm("tversky", alpha=0.0), SIGMOID4, ValueError, r"alpha .* must be in \(0, 1\)"),
        (LossTerm("focal", gamma=-1.0), BINARY, ValueError, "gamma must be >= 0"),
        (LossTerm("dice", weight=-1.0), SIGMOID4, ValueError, "weight must be >= 0"),
    ],
)
def test_check_loss_refuses(term, model, error, match):
    with pytest.raises(error, match=match):
        check_loss(term, model, "loss stage 0")


def test_unknown_loss_in_a_module_lists_valid_names():
    with pytest.raises(KeyError, match="valid losses"):
        WeightedLoss([LossTerm("jaccard")])
