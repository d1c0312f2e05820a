"""The kernel's time-budget planner: which stages run, at what size, and when each must stop (pure Python, no torch).

The kernel runs its stages in a fixed pipeline order::

    predict -> oof -> search -> pseudo -> averaging -> write

``predict`` (test-set fold ensemble with TTA) and ``write`` (post-process + RLE + CSV) are mandatory. A valid
plain-ensemble submission is written right after ``predict``; every later stage may only improve on it, so a stage
that overruns is stopped at its deadline and the best submission so far is kept.

How the pipeline uses this module::

    budget = Budget(limit_s=3300.0, margin_s=120.0)     # started at the kernel's first line
    requests = [StageRequest("predict", 5506, 0.12, mandatory=True, label="hv",
                             shrink_steps=(Variant("h", 0.07), Variant("none", 0.04)), unit_name="images"),
                StageRequest("oof", 1000, 0.03, min_units=200, value=3.0, unit_name="images"),
                StageRequest("search", 1, 20.0, value=3.0, requires=("oof",)),
                ...,
                StageRequest("write", 5506, 0.005, mandatory=True, unit_name="images")]
    measurements, timeline, done = Measurements(), Timeline(), set()
    current = plan(requests, budget.remaining())
    print("\\n".join(current.summary_lines()))
    for request in requests:
        decision = current[request.name]
        if decision.action == "dropped":
            timeline.dropped(decision)
        else:
            deadline = budget.deadline_for(current.allowance_s(request.name, budget.remaining()))
            with timeline.stage(decision) as log:
                ...  # run decision.units of the stage with variant decision.variant, calling deadline.check()
                ...  # between batches and measurements.add(request.key(decision.variant), n, seconds) per batch
                log.units_done, log.effect["dice"] = ..., ...
        done.add(request.name)
        current = replan(requests, measurements, budget, done=done)   # new estimates for the stages still to come

``plan`` never raises for lack of time: mandatory stages that cannot fit are shrunk as far as they go and marked
``over_budget`` (the kernel then stops them by their deadline and keeps what they produced), and optional stages are
shrunk or dropped with a reason. Measured throughput should skip each stage's first (warm-up) batch.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "ACTIONS",
    "Budget",
    "Deadline",
    "ExpiringDeadline",
    "Decision",
    "Measurements",
    "Plan",
    "StageLog",
    "StageRequest",
    "StageTimeout",
    "Throughput",
    "Timeline",
    "Variant",
    "plan",
    "replan",
]

#: a clock: seconds as a float from an arbitrary origin, never going backwards (``time.monotonic``)
Clock = Callable[[], float]
#: what the planner decides for a stage: full size, a cheaper variant or fewer units, or not at all
ACTIONS = ("run", "shrunk", "dropped")
#: slack in float comparisons of seconds
_EPS = 1e-9


class StageTimeout(Exception):
    """Raised by :meth:`Deadline.check` when a stage has passed its deadline."""


@dataclass(frozen=True)
class Deadline:
    """An absolute point on ``clock`` after which a stage must stop.

    Attributes:
        at: the deadline in ``clock`` seconds (``math.inf`` = never).
        clock: the clock ``at`` refers to.
        stage: name used in the :class:`StageTimeout` message.
    """

    at: float
    clock: Clock = time.monotonic
    stage: str = ""

    @classmethod
    def unlimited(cls, clock: Clock = time.monotonic, stage: str = "") -> Deadline:
        """A deadline that never passes (local runs, tests)."""
        return cls(math.inf, clock, stage)

    def left(self) -> float:
        """Seconds until the deadline; negative once it has passed."""
        return self.at - self.clock()

    @property
    def passed(self) -> bool:
        """Whether the deadline has passed."""
        return self.left() < 0

    def check(self) -> None:
        """Call between batches or steps: raise :class:`StageTimeout` once the deadline has passed."""
        left = self.left()
        if left < 0:
            name = f"{self.stage} " if self.stage else ""
            raise StageTimeout(f"{name}passed its deadline by {-left:.1f} s")


class ExpiringDeadline:
    """A stage's deadline that also passes at its ``after``-th :meth:`check`: rehearses the time limit arriving in
    the middle of the stage (``steelkit kernel --simulate-timeout STAGE[:N]``).

    Attributes:
        inner: the real deadline, still enforced before then.
        after: the check that raises.
        checks: checks so far.
    """

    def __init__(self, inner: Deadline, after: int = 1) -> None:
        self.inner = inner
        self.after = after
        self.checks = 0
        self.stage = inner.stage

    def left(self) -> float:
        return -1.0 if self.checks >= self.after else self.inner.left()

    @property
    def passed(self) -> bool:
        return self.left() < 0

    def check(self) -> None:
        self.checks += 1
        if self.checks >= self.after:
            raise StageTimeout(f"{self.stage} reached the simulated time limit at check {self.checks}")
        self.inner.check()


@dataclass(frozen=True)
class Budget:
    """The kernel's whole time budget, counted from ``start``.

    Attributes:
        limit_s: seconds the kernel may take in all (e.g. 3300 of Kaggle's 3600).
        margin_s: seconds kept back at the end for safety (interpreter exit, file flushes).
        clock: the clock; ``time.monotonic`` unless a test injects a fake one.
        start: ``clock()`` at the kernel's start; ``None`` = now.
    """

    limit_s: float
    margin_s: float = 0.0
    clock: Clock = time.monotonic
    start: float | None = None

    def __post_init__(self) -> None:
        if not self.limit_s > 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")
        if self.margin_s < 0:
            raise ValueError(f"margin_s must be >= 0, got {self.margin_s}")
        if self.start is None:
            object.__setattr__(self, "start", self.clock())

    @property
    def end(self) -> float:
        """The last usable instant on ``clock``: ``start + limit_s - margin_s``."""
        return self.start + self.limit_s - self.margin_s

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return self.clock() - self.start

    def remaining(self) -> float:
        """``limit_s - margin_s - elapsed()``; negative once the usable budget is spent (no floor)."""
        return self.end - self.clock()

    def deadline_for(self, seconds: float | None = None, stage: str = "") -> Deadline:
        """A deadline ``seconds`` from now, but never past :attr:`end`; ``None`` = :attr:`end` itself."""
        at = self.end if seconds is None else min(self.clock() + max(seconds, 0.0), self.end)
        return Deadline(at, self.clock, stage)


@dataclass(frozen=True)
class Throughput:
    """Measured speed of one stage (or one variant of it).

    Attributes:
        name: the measurement key, see :meth:`StageRequest.key`.
        units: units processed (images, steps, candidates).
        seconds: wall seconds they took.
    """

    name: str
    units: float
    seconds: float

    def __post_init__(self) -> None:
        if self.units < 0 or self.seconds < 0:
            raise ValueError(f"{self.name}: units and seconds must be >= 0, got {self.units}, {self.seconds}")

    @property
    def rate(self) -> float:
        """Units per second (``inf`` when no time was measured, 0 when no units)."""
        if self.seconds <= 0:
            return math.inf if self.units > 0 else 0.0
        return self.units / self.seconds

    @property
    def seconds_per_unit(self) -> float | None:
        """Seconds per unit, ``None`` before any unit was measured."""
        return self.seconds / self.units if self.units > 0 else None

    def merged(self, units: float, seconds: float) -> Throughput:
        """This measurement plus ``units`` more done in ``seconds`` more."""
        return Throughput(self.name, self.units + units, self.seconds + seconds)


class Measurements:
    """Throughputs measured while the kernel runs, keyed by stage (or ``"stage/variant"``)."""

    def __init__(self) -> None:
        self._items: dict[str, Throughput] = {}

    def add(self, name: str, units: float, seconds: float) -> Throughput:
        """Record ``units`` done in ``seconds`` under ``name`` (summed with earlier records); returns the total."""
        current = self._items.get(name, Throughput(name, 0, 0.0))
        self._items[name] = current.merged(units, seconds)
        return self._items[name]

    def get(self, name: str) -> Throughput | None:
        """The accumulated measurement, ``None`` when there is none."""
        return self._items.get(name)

    def seconds_per_unit(self, name: str, default: float | None = None) -> float | None:
        """Measured seconds per unit of ``name``, ``default`` when nothing was measured."""
        item = self._items.get(name)
        spu = item.seconds_per_unit if item is not None else None
        return default if spu is None else spu

    def __contains__(self, name: object) -> bool:
        return name in self._items and self._items[name].units > 0

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-friendly ``{name: {units, seconds, seconds_per_unit}}``."""
        return {
            k: {"units": v.units, "seconds": v.seconds, "seconds_per_unit": v.seconds_per_unit or 0.0}
            for k, v in self._items.items()
        }


@dataclass(frozen=True)
class Variant:
    """A cheaper way to run a stage, tried before its units are reduced (e.g. TTA ``"h"`` instead of ``"hv"``).

    Attributes:
        label: what the stage is told to do, e.g. the TTA views.
        seconds_per_unit: estimated cost of one unit in this variant.
        units: units in this variant; ``None`` = the request's units.
    """

    label: str
    seconds_per_unit: float
    units: int | None = None


@dataclass(frozen=True)
class StageRequest:
    """What a stage would like to do and what it costs.

    Attributes:
        name: stage name, unique in a plan.
        units: units wanted (images, fine-tune steps x rounds, candidate evaluations).
        seconds_per_unit: estimated seconds per unit at full size.
        min_units: the smallest useful size; units are reduced down to it before the stage is dropped.
            ``None`` = ``units`` (the stage is all or nothing, apart from its variants).
        fixed_seconds: setup cost paid whatever the size (model loading, a data loader's start).
        value: expected benefit; optional stages are funded highest value first, ties in pipeline order.
        mandatory: ``predict`` and ``write``: funded first and never dropped.
        label: the full-size variant's label (e.g. ``"hv"``).
        shrink_steps: cheaper variants, in the order they are tried; units are reduced only in the last one.
        requires: stages whose output this one needs; it is dropped when any of them is dropped.
        unit_name: plural noun for log lines (``"images"``, ``"steps"``).
    """

    name: str
    units: int
    seconds_per_unit: float
    min_units: int | None = None
    fixed_seconds: float = 0.0
    value: float = 0.0
    mandatory: bool = False
    label: str = ""
    shrink_steps: tuple[Variant, ...] = ()
    requires: tuple[str, ...] = ()
    unit_name: str = "units"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shrink_steps", tuple(self.shrink_steps))
        object.__setattr__(self, "requires", tuple(self.requires))
        if not self.name or "/" in self.name:
            raise ValueError(f"a stage needs a name without '/', got {self.name!r}")
        if self.units < 0:
            raise ValueError(f"{self.name}: units must be >= 0, got {self.units}")
        if self.min_units is not None and not 0 <= self.min_units <= self.units:
            raise ValueError(f"{self.name}: min_units must lie in [0, {self.units}], got {self.min_units}")
        if self.fixed_seconds < 0:
            raise ValueError(f"{self.name}: fixed_seconds must be >= 0, got {self.fixed_seconds}")
        for units, spu, label in self.ladder():
            if spu < 0 or not math.isfinite(spu):
                raise ValueError(f"{self.name}/{label}: seconds_per_unit must be finite and >= 0, got {spu}")
            if units < self.smallest:
                raise ValueError(f"{self.name}/{label}: {units} units is below min_units {self.smallest}")
        labels = [label for _, _, label in self.ladder()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{self.name}: variant labels must be distinct, got {labels}")
        if self.name in self.requires:
            raise ValueError(f"{self.name} cannot require itself")

    @property
    def smallest(self) -> int:
        """The smallest number of units worth running."""
        return self.units if self.min_units is None else self.min_units

    def ladder(self) -> list[tuple[int, float, str]]:
        """``(units, seconds_per_unit, label)`` of the full size and then each shrink step, in trying order."""
        steps = [(self.units, self.seconds_per_unit, self.label)]
        steps += [(self.units if v.units is None else v.units, v.seconds_per_unit, v.label) for v in self.shrink_steps]
        return steps

    def cost(self, units: int, seconds_per_unit: float) -> float:
        """Estimated seconds for ``units`` at ``seconds_per_unit``, setup included."""
        return self.fixed_seconds + units * seconds_per_unit

    def key(self, label: str | None = None) -> str:
        """Measurement key of a variant: ``"name/label"``, or ``"name"`` for an unlabelled stage."""
        label = self.label if label is None else label
        return f"{self.name}/{label}" if label else self.name

    def with_measurements(self, measurements: Measurements) -> StageRequest:
        """This request with measured seconds per unit where a variant was measured.

        Unmeasured variants are scaled by the mean ratio measured / estimated of the measured ones, so a stage that
        ran ``"h"`` 20 % slower than estimated also re-estimates ``"hv"`` 20 % slower.
        """
        ratios = []
        for _, spu, label in self.ladder():
            measured = measurements.seconds_per_unit(self.key(label))
            if measured is not None and spu > 0:
                ratios.append(measured / spu)
        if not ratios:
            return self
        ratio = sum(ratios) / len(ratios)

        def updated(spu: float, label: str) -> float:
            return measurements.seconds_per_unit(self.key(label), spu * ratio)

        steps = tuple(replace(v, seconds_per_unit=updated(v.seconds_per_unit, v.label)) for v in self.shrink_steps)
        return replace(self, seconds_per_unit=updated(self.seconds_per_unit, self.label), shrink_steps=steps)


@dataclass(frozen=True)
class Decision:
    """What the planner decided for one stage.

    Attributes:
        name: the stage.
        action: one of :data:`ACTIONS`.
        units: units to run (0 when dropped).
        variant: label of the variant to run (the request's ``label`` when not shrunk by variant).
        estimated_s: estimated seconds (0 when dropped).
        reason: why it was shrunk or dropped, or ``""``.
        requested_units: the request's full units.
        requested_variant: the request's full-size label.
        mandatory: copied from the request.
        over_budget: a mandatory stage that does not fit even at its smallest; the kernel stops it by its deadline.
        unit_name: plural noun of the units.
    """

    name: str
    action: str
    units: int
    variant: str
    estimated_s: float
    reason: str = ""
    requested_units: int = 0
    requested_variant: str = ""
    mandatory: bool = False
    over_budget: bool = False
    unit_name: str = "units"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"{self.name}: action must be one of {ACTIONS}, got {self.action!r}")

    @property
    def runs(self) -> bool:
        """Whether the stage runs at all."""
        return self.action != "dropped"

    def summary_line(self) -> str:
        """One readable line, e.g. ``"oof: shrunk 1000 -> 312 images, est 41.0 s (budget)"``."""
        if self.action == "dropped":
            return f"{self.name}: dropped ({self.reason})"
        if self.variant != self.requested_variant:
            size = f"[{self.requested_variant or '-'}] -> [{self.variant or '-'}], "
        else:
            size = f"[{self.variant}] " if self.variant else ""
        if self.units != self.requested_units:
            size += f"{self.requested_units} -> {self.units} {self.unit_name}"
        else:
            size += f"{self.units} {self.unit_name}"
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.name}: {self.action} {size}, est {self.estimated_s:.1f} s{reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of every field."""
        return {
            "name": self.name,
            "action": self.action,
            "units": self.units,
            "variant": self.variant,
            "estimated_s": round(self.estimated_s, 3),
            "reason": self.reason,
            "requested_units": self.requested_units,
            "requested_variant": self.requested_variant,
            "mandatory": self.mandatory,
            "over_budget": self.over_budget,
            "unit_name": self.unit_name,
        }


@dataclass(frozen=True)
class Plan:
    """Decisions for every requested stage, in pipeline order.

    Attributes:
        decisions: one per request, in the requests' order.
        available_s: seconds the plan was made for.
        reserve_s: seconds kept back from ``available_s``.
    """

    decisions: tuple[Decision, ...]
    available_s: float
    reserve_s: float = 0.0

    def __getitem__(self, name: str) -> Decision:
        for decision in self.decisions:
            if decision.name == name:
                return decision
        raise KeyError(f"no stage {name!r} in the plan; stages: {[d.name for d in self.decisions]}")

    def __contains__(self, name: object) -> bool:
        return any(d.name == name for d in self.decisions)

    @property
    def total_estimated_s(self) -> float:
        """Estimated seconds of every stage that runs."""
        return sum(d.estimated_s for d in self.decisions if d.runs)

    @property
    def over_budget(self) -> bool:
        """Whether a mandatory stage could not fit."""
        return any(d.over_budget for d in self.decisions)

    def allowance_s(self, name: str, remaining_s: float, overrun: float = 1.5) -> float:
        """Seconds stage ``name`` may take from now before it is stopped: what time is left after the mandatory
        stages behind it; an optional stage is also held to ``overrun`` times its estimate, so a stage much slower
        than its estimate stops instead of crowding out the ones after it (which :func:`replan` then re-sizes).

        Pass the result to :meth:`Budget.deadline_for`.
        """
        index = next((i for i, d in enumerate(self.decisions) if d.name == name), None)
        if index is None:
            raise KeyError(f"no stage {name!r} in the plan")
        decision = self.decisions[index]
        later = sum(d.estimated_s for d in self.decisions[index + 1 :] if d.mandatory and d.runs)
        cap = remaining_s - later
        if not decision.mandatory:
            cap = min(cap, decision.estimated_s * overrun)
        return max(cap, 0.0)

    def summary_lines(self) -> list[str]:
        """One line per stage, in pipeline order, for the kernel's log."""
        return [d.summary_line() for d in self.decisions]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: available and reserved seconds, the total estimate and every decision."""
        return {
            "available_s": round(self.available_s, 3),
            "reserve_s": round(self.reserve_s, 3),
            "total_estimated_s": round(self.total_estimated_s, 3),
            "over_budget": self.over_budget,
            "stages": [d.to_dict() for d in self.decisions],
        }


def _fit(request: StageRequest, left: float) -> Decision | None:
    """The largest form of ``request`` that fits in ``left`` seconds: the full size, else each shrink step in turn,
    else the last step with units reduced (never below ``min_units`` nor to 0); ``None`` when nothing fits."""
    common = dict(
        name=request.name,
        requested_units=request.units,
        requested_variant=request.label,
        mandatory=request.mandatory,
        unit_name=request.unit_name,
    )
    ladder = request.ladder()
    for i, (units, spu, label) in enumerate(ladder):
        cost = request.cost(units, spu)
        if cost <= left + _EPS:
            action, reason = ("run", "") if i == 0 else ("shrunk", "budget")
            return Decision(action=action, units=units, variant=label, estimated_s=cost, reason=reason, **common)
    units, spu, label = ladder[-1]
    if spu > 0:
        fitting = min(units, math.floor((left - request.fixed_seconds) / spu + _EPS))
        if fitting >= max(request.smallest, 1):
            cost = request.cost(fitting, spu)
            return Decision(action="shrunk", units=fitting, variant=label, estimated_s=cost, reason="budget", **common)
    return None


def _smallest(request: StageRequest) -> Decision:
    """The cheapest form of a request, whether or not it fits: the cheapest step, or the last step reduced to
    ``min_units`` (at least 1); ties go to the earlier, larger form."""
    ladder = request.ladder()
    options = [(request.cost(units, spu), i, units, spu, label) for i, (units, spu, label) in enumerate(ladder)]
    units, spu, label = ladder[-1]
    reduced = min(units, max(request.smallest, 1))
    options.append((request.cost(reduced, spu), len(ladder), reduced, spu, label))
    cost, index, units, _, label = min(options, key=lambda o: (o[0], o[1]))
    return Decision(
        name=request.name,
        action="run" if index == 0 else "shrunk",
        units=units,
        variant=label,
        estimated_s=cost,
        requested_units=request.units,
        requested_variant=request.label,
        mandatory=request.mandatory,
        unit_name=request.unit_name,
    )


def _dropped(request: StageRequest, reason: str) -> Decision:
    return Decision(
        name=request.name,
        action="dropped",
        units=0,
        variant=request.label,
        estimated_s=0.0,
        reason=reason,
        requested_units=request.units,
        requested_variant=request.label,
        mandatory=request.mandatory,
        unit_name=request.unit_name,
    )


def _allocate(requests: Sequence[StageRequest], budget_s: float, excluded: Mapping[str, str]) -> list[Decision]:
    """One allocation pass; ``excluded`` maps stages dropped beforehand to their reasons."""
    decisions: dict[str, Decision] = {}
    mandatory = [r for r in requests if r.mandatory]
    used = 0.0
    for i, request in enumerate(mandatory):
        later = sum(_smallest(r).estimated_s for r in mandatory[i + 1 :])
        left = budget_s - used - later
        decision = _fit(request, left)
        if decision is None:
            smallest = _smallest(request)
            reason = f"over budget: needs {smallest.estimated_s:.1f} s, {max(left, 0.0):.1f} s left"
            decision = replace(smallest, reason=reason, over_budget=True)
        decisions[request.name] = decision
        used += decision.estimated_s
    order = sorted((r for r in requests if not r.mandatory), key=lambda r: -r.value)  # stable: ties keep their order
    for request in order:
        left = budget_s - used
        if request.name in excluded:
            decision = _dropped(request, excluded[request.name])
        elif request.units == 0:
            decision = _dropped(request, "nothing to do (0 units)")
        else:
            decision = _fit(request, left)
            if decision is None:
                smallest = _smallest(request)
                decision = _dropped(request, f"needs {smallest.estimated_s:.1f} s, {max(left, 0.0):.1f} s left")
        decisions[request.name] = decision
        used += decision.estimated_s
    return [decisions[r.name] for r in requests]


def plan(requests: Sequence[StageRequest], available_s: float, reserve_s: float = 0.0) -> Plan:
    """Share ``available_s - reserve_s`` seconds among stages given in pipeline order.

    Mandatory stages are funded first, in pipeline order, each leaving room for the smallest form of the mandatory
    stages after it; one that cannot fit takes its smallest form and is marked ``over_budget``. Optional stages are
    then funded highest ``value`` first (ties in pipeline order): the full size if it fits, else the first shrink
    step that fits, else the last step with as many units as fit down to ``min_units``, else dropped. A stage whose
    ``requires`` names a dropped (or unknown) stage is dropped too and its time given to the others.

    Args:
        requests: one per stage, in pipeline order; names unique.
        available_s: seconds left for all of them (may be <= 0: only mandatory stages are kept, over budget).
        reserve_s: seconds kept back, e.g. for the final report.

    Returns:
        The :class:`Plan`, decisions in the requests' order.
    """
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    for r in requests:
        if r.mandatory and r.requires:
            raise ValueError(f"{r.name}: a mandatory stage cannot require other stages")
    budget_s = available_s - reserve_s
    excluded: dict[str, str] = {}
    while True:
        decisions = _allocate(requests, budget_s, excluded)
        running = {d.name for d in decisions if d.runs}
        newly = {}
        for request in requests:
            missing = [n for n in request.requires if n not in running]
            if request.name in running and missing:
                newly[request.name] = f"needs {', '.join(missing)}, which does not run"
        if not newly:
            return Plan(tuple(decisions), available_s, reserve_s)
        excluded.update(newly)


def replan(
    requests: Sequence[StageRequest],
    measurements: Measurements,
    budget: Budget,
    done: Sequence[str] | set[str] = (),
    reserve_s: float = 0.0,
) -> Plan:
    """Plan the stages not yet ``done`` again, with measured throughput and the budget's remaining time.

    Call after every stage. Requirements on stages already done count as met.
    """
    finished = set(done)
    remaining = [
        replace(r.with_measurements(measurements), requires=tuple(n for n in r.requires if n not in finished))
        for r in requests
        if r.name not in finished
    ]
    return plan(remaining, budget.remaining(), reserve_s)


@dataclass
class StageLog:
    """What one stage did; filled in while it runs, then kept in ``kernel_report.json``.

    Attributes:
        name: the stage.
        estimated_s: the plan's estimate.
        actual_s: measured seconds (``None`` until it ends; 0 when dropped).
        outcome: ``"pending"``, ``"done"``, ``"stopped at deadline"``, ``"dropped"`` or ``"failed: ..."``.
        start_s: seconds from the timeline's start to the stage's start.
        units_planned, units_done: the plan's units and those the stage reports as finished.
        variant: the variant it ran.
        effect: free-form JSON-friendly results, e.g. ``{"oof_dice_before": 0.91, "oof_dice_after": 0.92}``.
        error: the traceback of a failure.
    """

    name: str
    estimated_s: float = 0.0
    actual_s: float | None = None
    outcome: str = "pending"
    start_s: float = 0.0
    units_planned: int = 0
    units_done: int | None = None
    variant: str = ""
    effect: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the stage finished or stopped at its deadline with its partial result usable."""
        return self.outcome in ("done", "stopped at deadline")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of every field."""
        return {
            "name": self.name,
            "estimated_s": round(self.estimated_s, 3),
            "actual_s": None if self.actual_s is None else round(self.actual_s, 3),
            "outcome": self.outcome,
            "start_s": round(self.start_s, 3),
            "units_planned": self.units_planned,
            "units_done": self.units_done,
            "variant": self.variant,
            "effect": dict(self.effect),
            "error": self.error,
        }


class Timeline:
    """The :class:`StageLog` of every stage, in the order they ran, timed on one clock."""

    def __init__(self, clock: Clock = time.monotonic, start: float | None = None) -> None:
        self.clock = clock
        self.start = clock() if start is None else start
        self.logs: list[StageLog] = []

    def dropped(self, decision: Decision) -> StageLog:
        """Record a stage the plan dropped."""
        log = StageLog(
            decision.name,
            actual_s=0.0,
            outcome="dropped",
            start_s=self.clock() - self.start,
            units_planned=decision.requested_units,
            units_done=0,
            variant=decision.variant,
            effect={"reason": decision.reason},
        )
        self.logs.append(log)
        return log

    @contextmanager
    def stage(self, decision: Decision, suppress: bool = True) -> Iterator[StageLog]:
        """Time one stage: ``with timeline.stage(decision) as log: ...``.

        A :class:`StageTimeout` ends the stage as ``"stopped at deadline"``; any other ``Exception`` as
        ``"failed: <type>: <message>"`` with its traceback in ``log.error``, re-raised only when ``suppress`` is
        false. Check ``log.ok`` after the block before using the stage's result.
        """
        log = StageLog(
            decision.name,
            estimated_s=decision.estimated_s,
            start_s=self.clock() - self.start,
            units_planned=decision.units,
            variant=decision.variant,
        )
        self.logs.append(log)
        began = self.clock()
        try:
            yield log
            log.outcome = "done"
        except StageTimeout as error:
            log.outcome = "stopped at deadline"
            log.effect.setdefault("timeout", str(error))
        except Exception as error:
            log.outcome = f"failed: {type(error).__name__}: {error}"
            log.error = traceback.format_exc()
            if not suppress:
                raise
        finally:
            log.actual_s = self.clock() - began

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-friendly list of the stage logs."""
        return [log.to_dict() for log in self.logs]
