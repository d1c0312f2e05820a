"""Weight averaging of checkpoints: weighted state-dict means, greedy soups and BatchNorm recalibration.

Averaging the weights of several fine-tuned models of one architecture gives one model at the inference cost of one.
``greedy_average`` is the "greedy soup" of model soups (Wortsman et al., 2022; the 12th place Severstal recipe): a
candidate is kept only when the average with it scores at least as well. ``recalibrate_batchnorm`` then recomputes
the BatchNorm running statistics of the averaged weights from training batches, since the average of running
statistics is not the statistics of the averaged network.

TorchScript: the BatchNorm ``momentum`` of a scripted module is a compiled constant. Assigning it on a loaded (or
``named_modules``) ``RecursiveScriptModule`` raises ``RuntimeError: Can't set constant 'momentum'``; worse, on a
freshly scripted ``nn.Sequential``, ``scripted[i]`` returns the original eager layer, where the assignment succeeds but
the compiled ``forward`` ignores it. ``recalibrate_batchnorm`` therefore never relies on ``momentum=None`` for scripted
layers: before every batch it zeroes the running buffers, so that after the forward pass they hold ``momentum x`` the
batch statistics, and it averages ``buffer / momentum`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "average_state_dicts",
    "cpu_state_dict",
    "GreedyResult",
    "greedy_average",
    "norm_layers",
    "recalibrate_batchnorm",
]

#: how many missing / extra keys a key-mismatch error lists
_KEYS_SHOWN = 8


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (eager or TorchScript): a snapshot later training cannot change."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Validated weights: ``count`` finite non-negative numbers with a positive sum (uniform when ``None``)."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} state dicts")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights}")
    return weights


def _check_keys(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first state dict whose keys differ from those of state dict 0."""
    reference = set(state_dicts[0])
    for index, state in enumerate(state_dicts[1:], start=1):
        keys = set(state)
        if keys != reference:
            missing, extra = sorted(reference - keys), sorted(keys - reference)
            raise ValueError(
                f"state dict {index} has different keys from state dict 0: "
                f"missing {missing[:_KEYS_SHOWN]}{' ...' if len(missing) > _KEYS_SHOWN else ''} ({len(missing)}), "
                f"extra {extra[:_KEYS_SHOWN]}{' ...' if len(extra) > _KEYS_SHOWN else ''} ({len(extra)})"
            )


def _average_tensors(key: str, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of same-shape tensors on the CPU, in the dtype of the first.

    Floating tensors are averaged in float64 (complex in complex128), integer tensors take the float64 mean rounded
    half to even, bool tensors the first's value. The running form ``m += w_k / W_k * (x_k - m)`` returns ``x``
    exactly when every tensor equals ``x`` (in any dtype, infinities included).
    """
    first = tensors[0]
    for index, tensor in enumerate(tensors[1:], start=1):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"key {key!r} of state dict {index} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != first.shape:
            raise ValueError(
                f"key {key!r}: shape {tuple(tensor.shape)} in state dict {index} "
                f"differs from {tuple(first.shape)} in state dict 0"
            )
    if first.dtype == torch.bool:
        return first.detach().cpu().clone()
    accumulate = torch.complex128 if first.is_complex() else torch.float64
    mean, total = None, 0.0
    for tensor, weight in zip(tensors, weights):
        if weight == 0:
            continue
        total += weight
        value = tensor.detach().cpu().to(accumulate)
        if mean is None:
            mean = value
        else:
            mean = torch.where(value == mean, mean, mean + (weight / total) * (value - mean))
    if first.is_floating_point() or first.is_complex():
        return mean.to(first.dtype)
    return torch.round(mean).to(first.dtype)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts of one architecture.

    Args:
        state_dicts: ``S >= 1`` mappings with identical keys and, per key, identical shapes.
        weights: ``S`` finite non-negative weights with a positive sum (normalised here); uniform when ``None``.

    Returns:
        New CPU tensors in the key order of ``state_dicts[0]``, each in the dtype of ``state_dicts[0]``: floating
        tensors the float64 weighted mean cast back; integer tensors (BatchNorm ``num_batches_tracked``, int64) the
        weighted mean rounded half to even (exact for ``|x| < 2**53``); bool tensors the first's value. One state dict,
        or ``S`` copies of one, comes back ``torch.equal`` to the input.

    Raises:
        ValueError: no state dicts; keys differ (names the state dict's index and its missing and extra keys); shapes
            differ (names the key and both shapes); bad weights.
        TypeError: a value is not a tensor (names the key).
    """
    if len(state_dicts) == 0:
        raise ValueError("no state dicts to average")
    weights = _check_weights(weights, len(state_dicts))
    _check_keys(state_dicts)
    out = {}
    for key, first in state_dicts[0].items():
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"key {key!r} of state dict 0 is a {type(first).__name__}, not a tensor")
        out[key] = _average_tensors(key, [state[key] for state in state_dicts], weights)
    return out


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of ``greedy_average``.

    Attributes:
        state_dict: uniform average of the chosen state dicts (CPU tensors).
        chosen: names of the chosen candidates in the order they were added; the first is the best alone.
        score: score of ``state_dict``.
        individual: score of every candidate alone, by name.
        history: one entry per candidate tried after the first, in rank order:
            ``{"name": str, "score_with": float, "kept": bool}``.
    """

    state_dict: dict[str, torch.Tensor]
    chosen: tuple[str, ...]
    score: float
    individual: dict[str, float]
    history: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (everything but the state dict)."""
        return {
            "chosen": list(self.chosen),
            "score": self.score,
            "individual": dict(self.individual),
            "history": [dict(entry) for entry in self.history],
        }


def greedy_average(
    candidates: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    score: Callable[[dict[str, torch.Tensor]], float],
    individual_scores: Sequence[float] | None = None,
) -> GreedyResult:
    """Greedy soup: add candidates in order of their own score while the uniform average does not get worse.

    Candidates are ranked by individual score, best first (ties keep the input order). The soup starts as the best
    candidate; each next candidate is kept when ``score`` of the uniform average of the chosen ones plus it is
    ``>=`` the current score (ties keep), and skipped otherwise. Higher scores are better.

    Args:
        candidates: ``(name, state_dict)`` pairs with unique names and state dicts of one architecture.
        score: maps an averaged state dict (CPU tensors) to a score, e.g. validation Dice of a model loaded with it.
        individual_scores: the score of each candidate alone, aligned with ``candidates`` (e.g. the metric stored in
            each checkpoint); it must be on the scale of ``score``. Computed with ``score`` when ``None``.

    Returns:
        The chosen average, the names in the order added, its score, the individual scores and the trial history.

    Raises:
        ValueError: no candidates, duplicate names, misaligned or NaN individual scores, or state dicts that
            ``average_state_dicts`` rejects.
    """
    if len(candidates) == 0:
        raise ValueError("no candidates to average")
    names = [name for name, _ in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    if individual_scores is None:
        individual_scores = [float(score(average_state_dicts([state]))) for _, state in candidates]
    elif len(individual_scores) != len(candidates):
        raise ValueError(f"{len(individual_scores)} individual scores for {len(candidates)} candidates")
    individual = {name: float(value) for name, value in zip(names, individual_scores)}
    if any(math.isnan(value) for value in individual.values()):
        raise ValueError(f"individual scores must not be NaN, got {individual}")
    order = sorted(range(len(candidates)), key=lambda i: -individual[names[i]])
    first = order[0]
    chosen, states = [names[first]], [candidates[first][1]]
    best, best_state = individual[names[first]], None
    history = []
    for i in order[1:]:
        name, state = candidates[i]
        averaged = average_state_dicts([*states, state])
        score_with = float(score(averaged))
        kept = score_with >= best
        history.append({"name": name, "score_with": score_with, "kept": kept})
        if kept:
            chosen.append(name)
            states.append(state)
            best, best_state = score_with, averaged
    if best_state is None:
        best_state = average_state_dicts(states)
    return GreedyResult(best_state, tuple(chosen), best, individual, tuple(history))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules with BatchNorm-style running statistics, in ``named_modules`` order.

    A layer qualifies when ``running_mean`` and ``running_var`` are tensors and it has a ``momentum`` attribute: every
    ``_BatchNorm`` (and ``InstanceNorm`` with ``track_running_stats=True``) in eager models, and the same layers inside
    a ``torch.jit.script``-ed or loaded TorchScript model, where ``isinstance`` checks cannot see the class. Layers with
    ``track_running_stats=False`` (``running_mean is None``) do not qualify.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "running_mean", None), torch.Tensor)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
        and hasattr(module, "momentum")
    ]


def _counter(module: nn.Module) -> torch.Tensor | None:
    """The layer's ``num_batches_tracked`` buffer, or ``None``."""
    counter = getattr(module, "num_batches_tracked", None)
    return counter if isinstance(counter, torch.Tensor) else None


def _snapshot(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Copies of ``(running_mean, running_var, num_batches_tracked)``."""
    counter = _counter(module)
    return module.running_mean.clone(), module.running_var.clone(), None if counter is None else counter.clone()


def _write(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor | int | None) -> None:
    """Copy statistics into the layer's buffers in place (scripted modules share these tensors)."""
    module.running_mean.copy_(mean)
    module.running_var.copy_(var)
    counter = _counter(module)
    if counter is not None and count is not None:
        counter.copy_(torch.as_tensor(count))


def _zero(module: nn.Module) -> None:
    module.running_mean.zero_()
    module.running_var.zero_()
    counter = _counter(module)
    if counter is not None:
        counter.zero_()


def _prepare(name: str, module: nn.Module) -> float:
    """Make the layer write ``factor x`` its batch statistics onto zeroed buffers and return that factor.

    Eager layers that count batches get ``momentum=None`` (factor 1: ``1 / num_batches_tracked`` after zeroing).
    Scripted layers keep their compiled momentum: ``None`` gives factor 1, a number ``m`` gives ``m``.

    Raises:
        ValueError: the layer would not update its statistics (momentum 0, or ``None`` without a batch counter).
    """
    counter = _counter(module)
    if not isinstance(module, torch.jit.ScriptModule) and counter is not None:
        module.momentum = None
        return 1.0
    if module.momentum is None and counter is not None:
        return 1.0
    if not module.momentum:
        raise ValueError(f"layer {name!r} (momentum {module.momentum}) never updates its running statistics")
    return float(module.momentum)


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> int:
    """Recompute the BatchNorm running statistics of ``model`` (e.g. averaged weights) from training batches.

    Every layer of ``norm_layers(model)`` ends with ``running_mean`` / ``running_var`` equal to the mean over the
    batches of its per-batch input mean / unbiased variance (the cumulative average ``momentum=None`` gives, accumulated
    here in float64) and ``num_batches_tracked`` equal to the number of batches. The forward passes run in train mode
    under ``torch.no_grad()``; afterwards every module's ``training`` flag and every eager layer's ``momentum`` are
    restored. Weights are untouched. Works on eager modules and on TorchScript from ``torch.jit.script`` /
    ``torch.jit.load``, whose compiled ``momentum`` cannot be changed: before each batch the running buffers are zeroed,
    so that afterwards they hold ``factor x`` the batch statistics (factor 1 for ``momentum=None``, else
    ``momentum``), and ``buffer / factor`` is averaged. A layer that never runs keeps its statistics; if an error
    interrupts the pass, all statistics are restored.

    Args:
        model: a segmenter mapping ``(N, 3, H, W)`` to anything, already on ``device``.
        batches: ``(N, 3, H, W)`` float tensors, normalised as for training (``(image, mask)`` pairs from a training
            loader are accepted: the first element is used). ``N >= 2`` so that batch variances exist.
        device: where batches are moved before the forward pass.
        max_batches: use at most this many batches (all when ``None``).

    Returns:
        The number of batches used; 0, with the model untouched, when it has no such layer, ``max_batches == 0`` or
        ``batches`` is empty.

    Raises:
        ValueError: a traced module (``torch.jit.trace`` freezes BatchNorm in the mode it was traced in; script it
            instead), a layer with ``momentum == 0``, or a negative ``max_batches``.
        RuntimeError: batches were run but no layer counted one in train mode.
    """
    if isinstance(model, torch.jit.TracedModule):
        raise ValueError("traced modules freeze BatchNorm train/eval mode at trace time; use torch.jit.script")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0, got {max_batches}")
    layers = norm_layers(model)
    if not layers or max_batches == 0:
        return 0
    modes = [(module, module.training) for _, module in model.named_modules()]
    saved = [_snapshot(module) for _, module in layers]
    momenta = [module.momentum for _, module in layers]
    used, counts = 0, [0] * len(layers)
    try:
        factors = [_prepare(name, module) for name, module in layers]
        sums = [torch.zeros((2, *mean.shape), dtype=torch.float64, device=mean.device) for mean, _, _ in saved]
        model.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                for _, module in layers:
                    _zero(module)
                model(batch.to(device))
                used += 1
                for k, (_, module) in enumerate(layers):
                    counter = _counter(module)
                    if counter is not None and int(counter) == 0:
                        continue  # the layer did not run in train mode on this batch
                    sums[k][0].add_(module.running_mean, alpha=1 / factors[k])
                    sums[k][1].add_(module.running_var, alpha=1 / factors[k])
                    counts[k] += 1
        if used and not any(counts):
            raise RuntimeError(f"{used} batches ran but no BatchNorm layer updated its statistics in train mode")
        for k, (_, module) in enumerate(layers):
            if counts[k]:
                _write(module, *(sums[k] / counts[k]), counts[k])
            else:
                _write(module, *saved[k])  # never ran (or no batches): keep its statistics
    except BaseException:
        for (_, module), statistics in zip(layers, saved):
            _write(module, *statistics)
        raise
    finally:
        for (_, module), momentum in zip(layers, momenta):
            if not isinstance(module, torch.jit.ScriptModule):
                module.momentum = momentum
        for module, training in modes:
            module.training = training
    return used
