import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steelkit.averaging import average_state_dicts, greedy_average, norm_layers, recalibrate_batchnorm

#: non-square inputs of the BatchNorm tests: (batch size, H, W) per batch, sizes differ so that the mean is per batch
BATCH_SHAPES = [(4, 20, 52), (3, 20, 52), (5, 20, 52)]


@pytest.fixture(scope="module")
def unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return smp.Unet("resnet18", encoder_weights=None, classes=4, decoder_channels=(32, 16, 8, 8, 8))


def hand_made(w, count, flag, order=("w", "bn.num_batches_tracked", "flag")):
    values = {
        "w": torch.tensor(w, dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(count, dtype=torch.int64),
        "flag": torch.tensor([flag, True]),
    }
    return {key: values[key] for key in order}


A = hand_made([[1, 2, 3], [4, 5, 6]], 10, True)
B = hand_made([[3, 6, 7], [0, 1, 2]], 13, False, order=("flag", "w", "bn.num_batches_tracked"))


@pytest.mark.parametrize("copies", [1, 3])
def test_average_of_copies_of_a_unet_is_exact(unet, copies):
    state = unet.state_dict()
    for weights in (None, [0.1 * (k + 1) for k in range(copies)]):
        out = average_state_dicts([state] * copies, weights)
        assert list(out) == list(state)
        for key, value in state.items():
            assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    assert state["encoder.bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32])
def test_average_of_copies_is_exact_in_every_dtype(dtype):
    value = (torch.randn(7, 3, generator=torch.Generator().manual_seed(1)) * 1000).to(dtype)
    value[0, 0] = float("inf") if dtype.is_floating_point else 5
    for weights in ([1, 1, 1], [0.1, 0.7, 0.2], [0, 3, 0.3]):
        out = average_state_dicts([{"x": value}] * 3, weights)["x"]
        assert out.dtype == dtype and torch.equal(out, value)


@pytest.mark.parametrize(
    "weights, w, count",
    [
        (None, [[2, 4, 5], [2, 3, 4]], 12),  # 11.5 rounds half to even
        ([1, 3], [[2.5, 5, 6], [1, 2, 3]], 12),  # 12.25
        ([3, 1], [[1.5, 3, 4], [3, 4, 5]], 11),  # 10.75
        ([0.5, 0], [[1, 2, 3], [4, 5, 6]], 10),
        ([0, 2], [[3, 6, 7], [0, 1, 2]], 13),
    ],
)
def test_mean_and_weighted_mean_of_known_values(weights, w, count):
    out = average_state_dicts([A, B], weights)
    assert list(out) == list(A)
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.tensor(w, dtype=torch.float32))
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == count
    assert out["flag"].tolist() == [True, True]  # bools: the first's value


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "states, weights, match",
    [
        ([], None, "no state dicts"),
        ([A, A, without(A, "flag")], None, r"state dict 2 .*missing \['flag'\]"),
        ([A, {**B, "extra.bias": torch.zeros(2)}], None, r"state dict 1 .*extra \['extra.bias'\]"),
        ([A, {**B, "w": torch.zeros(3, 2)}], None, r"key 'w': shape \(3, 2\) in state dict 1 .* \(2, 3\)"),
        ([A, B], [1, -1], "non-negative"),
        ([A, B], [0, 0], "positive sum"),
        ([A, B], [1], "1 weights for 2"),
    ],
)
def test_mismatches_raise_and_name_the_key(states, weights, match):
    with pytest.raises(ValueError, match=match):
        average_state_dicts(states, weights)


#: candidates of the greedy test, scored by -|w|: ranked A, B, C, D; C alone beats D but pulls the average away
GREEDY = {"C": [0.3, 0.2], "D": [-0.3, -0.3], "A": [0.2, 0.0], "B": [-0.1, 0.2]}


def distance_score(state):
    return -float(state["w"].norm())


@pytest.mark.parametrize("precomputed", [False, True])
def test_greedy_average_keeps_helpful_candidates_in_rank_order(precomputed):
    candidates = [(name, {"w": torch.tensor(w, dtype=torch.float64)}) for name, w in GREEDY.items()]
    calls = []

    def score(state):
        calls.append(state["w"].clone())
        return distance_score(state)

    individual = [distance_score(state) for _, state in candidates] if precomputed else None
    result = greedy_average(candidates, score, individual)
    assert result.chosen == ("A", "B", "D")
    assert [(h["name"], h["kept"]) for h in result.history] == [("B", True), ("C", False), ("D", True)]
    expected = torch.tensor([[0.2, 0.0], [-0.1, 0.2], [0.3, 0.2], [-0.3, -0.3]], dtype=torch.float64)
    scores_with = [-float(expected[rows].mean(0).norm()) for rows in ([0, 1], [0, 1, 2], [0, 1, 3])]
    assert [h["score_with"] for h in result.history] == pytest.approx(scores_with)
    assert scores_with[1] < scores_with[0] < scores_with[2]  # C lowers the score and is rejected, D raises it
    torch.testing.assert_close(result.state_dict["w"], expected[[0, 1, 3]].mean(0))
    assert result.score == pytest.approx(scores_with[2]) == pytest.approx(distance_score(result.state_dict))
    assert result.individual == pytest.approx({name: -torch.tensor(w).norm().item() for name, w in GREEDY.items()})
    assert len(calls) == 3 + (0 if precomputed else 4)
    assert json.loads(json.dumps(result.to_dict()))["chosen"] == ["A", "B", "D"]


def test_greedy_ties_keep_and_rank_stably():
    candidates = [(name, {"w": torch.tensor(w)}) for name, w in GREEDY.items()]
    result = greedy_average(candidates, lambda state: 0.5)
    assert result.chosen == tuple(GREEDY) and all(h["kept"] for h in result.history)
    single = greedy_average(candidates[:1], distance_score)
    assert single.chosen == ("C",) and single.history == ()
    assert torch.equal(single.state_dict["w"], candidates[0][1]["w"])
    with pytest.raises(ValueError, match="no candidates"):
        greedy_average([], distance_score)
    with pytest.raises(ValueError, match="unique"):
        greedy_average([candidates[0], candidates[0]], distance_score)


def tiny_model(momentum):
    """Conv -> BN -> ReLU -> Conv -> BN with non-trivial weights and stale running statistics."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
        )
        for bn in (model[1], model[4]):
            nn.init.normal_(bn.weight)
            nn.init.normal_(bn.bias)
            bn.running_mean.fill_(7.0)
            bn.running_var.fill_(9.0)
            bn.num_batches_tracked.fill_(123)
    return model


def known_batches():
    """Normal inputs with per-channel means 2, -1, 0.5 and standard deviation 1.5."""
    generator = torch.Generator().manual_seed(3)
    shift = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    return [shift + 1.5 * torch.randn(n, 3, h, w, generator=generator) for n, h, w in BATCH_SHAPES]


def expected_statistics(model, batches):
    """Per-batch mean / unbiased variance of each BN input, averaged over batches, computed with functional ops."""
    conv1, bn1, _, conv2, _ = model
    stats = {"1": [], "4": []}
    with torch.no_grad():
        for x in batches:
            y = conv1(x)
            z = conv2(F.relu(F.batch_norm(y, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)))
            for name, t in (("1", y), ("4", z)):
                stats[name].append((t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=True)))
    return {name: [torch.stack(s).mean(0) for s in zip(*pairs)] for name, pairs in stats.items()}


def wrapped(model, wrap):
    if wrap == "eager":
        return model
    scripted = torch.jit.script(model)
    if wrap == "scripted":
        return scripted
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize(
    "wrap, momentum, training, max_batches, pairs",
    [
        ("eager", 0.1, False, None, False),
        ("eager", None, True, 2, True),
        ("scripted", 0.1, True, None, False),
        ("scripted", None, False, None, True),
        ("loaded", 0.1, False, 2, False),
        ("loaded", 0.5, True, None, False),
        ("loaded", None, False, None, False),
    ],
)
def test_recalibrated_statistics_match_the_batch_statistics(wrap, momentum, training, max_batches, pairs):
    eager = tiny_model(momentum)
    batches = known_batches()
    used_batches = batches[:max_batches] if max_batches else batches
    expected = expected_statistics(eager, used_batches)
    weights = {k: v.clone() for k, v in eager.state_dict().items() if "running" not in k and "tracked" not in k}
    model = wrapped(eager, wrap).train(training)
    model_batches = [(x, torch.zeros(len(x), 4, *x.shape[2:])) for x in batches] if pairs else batches
    assert recalibrate_batchnorm(model, iter(model_batches), max_batches=max_batches) == len(used_batches)
    assert model.training == training and all(m.training == training for m in model.modules())
    layers = dict(norm_layers(model))
    assert list(layers) == ["1", "4"]
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(layers[name].running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layers[name].running_var, var, rtol=1e-5, atol=1e-6)
        assert int(layers[name].num_batches_tracked) == len(used_batches)
        assert layers[name].momentum == (momentum if name == "1" else 0.1)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_scripted_unet_recalibrates_like_eager(unet):
    eager = copy.deepcopy(unet).eval()
    loaded = wrapped(eager, "loaded").eval()
    assert [name for name, _ in norm_layers(loaded)] == [
        name for name, m in eager.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with pytest.raises(RuntimeError, match="constant"):  # why recalibrate_batchnorm cannot set momentum=None there
        norm_layers(loaded)[0][1].momentum = None
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, 32, 64, generator=generator) for _ in range(2)]
    with torch.jit.optimized_execution(False):  # the profiling executor's first runs take seconds on 2 cores
        assert recalibrate_batchnorm(eager, batches) == recalibrate_batchnorm(loaded, batches) == 2
        assert not eager.training and not loaded.training
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(
            eager.state_dict()["encoder.bn1.running_var"], unet.state_dict()["encoder.bn1.running_var"]
        )
        with torch.no_grad():
            torch.testing.assert_close(loaded(batches[0]), eager(batches[0]), rtol=1e-4, atol=1e-4)


class Exploding:
    """An iterable of batches that fails on the given batch (or on any, when ``at`` is 0)."""

    def __init__(self, batches, at):
        self.batches, self.at = batches, at

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            if k == self.at:
                raise RuntimeError("batch loader failed")
            yield batch


def test_no_batchnorm_or_no_batches_leaves_the_model_untouched():
    plain = nn.Sequential(nn.Conv2d(3, 2, 1), nn.GroupNorm(1, 2)).eval()
    assert recalibrate_batchnorm(plain, Exploding([], 0)) == 0 and not plain.training
    model = tiny_model(0.1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, Exploding(known_batches(), 0), max_batches=0) == 0
    assert recalibrate_batchnorm(model, []) == 0
    with pytest.raises(RuntimeError, match="loader failed"):
        recalibrate_batchnorm(model, Exploding(known_batches(), 2))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training and model[1].momentum == 0.1
    traced = torch.jit.trace(model, known_batches()[0])
    with pytest.raises(ValueError, match="torch.jit.script"):
        recalibrate_batchnorm(traced, known_batches())
