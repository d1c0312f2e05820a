import json
import math
from dataclasses import replace

import pytest

from steelkit.kernel.plan import (
    Budget,
    Deadline,
    Measurements,
    StageRequest,
    StageTimeout,
    Timeline,
    Variant,
    plan,
    replan,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pipeline(**changes):
    """The kernel's six stages in pipeline order. Full costs: predict 100, oof 50, search 5, pseudo 90 (10 fixed),
    averaging 30, write 5; total 280."""
    requests = {
        "predict": StageRequest(
            "predict",
            100,
            1.0,
            min_units=1,
            mandatory=True,
            label="hv",
            shrink_steps=(Variant("h", 0.6), Variant("none", 0.3)),
            unit_name="images",
        ),
        "oof": StageRequest("oof", 50, 1.0, min_units=10, value=3.0, unit_name="images"),
        "search": StageRequest("search", 1, 5.0, value=3.0, requires=("oof",)),
        "pseudo": StageRequest("pseudo", 40, 2.0, min_units=20, fixed_seconds=10.0, value=2.0, unit_name="steps"),
        "averaging": StageRequest("averaging", 10, 3.0, min_units=5, value=1.0, requires=("oof",)),
        "write": StageRequest("write", 100, 0.05, mandatory=True, unit_name="images"),
    }
    for name, fields in changes.items():
        requests[name] = replace(requests[name], **fields)
    return list(requests.values())


def actions(result):
    return {d.name: d.action for d in result.decisions}


def test_everything_fits_runs_everything_at_full_size():
    result = plan(pipeline(), available_s=1000.0)
    assert [d.name for d in result.decisions] == ["predict", "oof", "search", "pseudo", "averaging", "write"]
    assert set(actions(result).values()) == {"run"}
    assert result["predict"].variant == "hv" and result["predict"].units == 100
    assert result.total_estimated_s == pytest.approx(280.0)
    assert not result.over_budget
    assert len(result.summary_lines()) == 6


def test_tight_budget_drops_the_lowest_value_stage_first():
    # mandatory 105, oof + search 55, pseudo 90 -> 250; averaging (value 1) needs 15 s (5 candidates), 5 s are left
    result = plan(pipeline(), available_s=255.0)
    assert actions(result) == {
        "predict": "run",
        "oof": "run",
        "search": "run",
        "pseudo": "run",
        "averaging": "dropped",
        "write": "run",
    }
    assert "15.0 s" in result["averaging"].reason and result["averaging"].estimated_s == 0
    assert result.total_estimated_s <= 255.0


def test_a_stage_is_shrunk_to_the_units_that_fit_but_never_below_min_units():
    # 75 s are left for pseudo: (75 - 10 fixed) / 2 s per step = 32 steps
    result = plan(pipeline(), available_s=235.0)
    pseudo = result["pseudo"]
    assert (pseudo.action, pseudo.units, pseudo.estimated_s) == ("shrunk", 32, pytest.approx(74.0))
    assert result["averaging"].action == "dropped"
    assert result.total_estimated_s <= 235.0
    assert pseudo.summary_line() == "pseudo: shrunk 40 -> 32 steps, est 74.0 s (budget)"
    # 49 s would allow 19 steps, below min_units = 20: dropped rather than shrunk
    assert plan(pipeline(), available_s=160.0 + 49.0)["pseudo"].action == "dropped"


@pytest.mark.parametrize("available", [0.0, 3.0, 20.0, 40.0, 104.9, 105.0, 130.0, 160.0, 199.0, 221.0, 279.9, 400.0])
def test_plan_invariants_over_budgets(available):
    requests = {r.name: r for r in pipeline()}
    result = plan(list(requests.values()), available)
    for d in result.decisions:
        request = requests[d.name]
        assert d.units <= request.units
        if d.mandatory:
            assert d.runs
        if d.runs and not d.over_budget:
            assert d.units >= request.smallest
            spu = {label: s for _, s, label in request.ladder()}[d.variant]
            assert d.estimated_s == pytest.approx(request.cost(d.units, spu))
    if not result.over_budget:
        assert result.total_estimated_s <= available + 1e-9
    ran = {d.name for d in result.decisions if d.runs}
    assert not ({"search", "averaging"} & ran) or "oof" in ran


@pytest.mark.parametrize(
    "available, variant, units",
    [
        (200.0, "hv", 100),  # fits at full size
        (70.0, "h", 100),  # hv (100 s) + write (5 s) do not fit: the h variant (60 s) does
        (40.0, "none", 100),  # h does not fit either: no TTA (30 s)
        (20.0, "none", 50),  # only then fewer images: (20 - 5) / 0.3 = 50
    ],
)
def test_predict_tries_cheaper_variants_before_fewer_images(available, variant, units):
    result = plan(pipeline(), available)
    predict = result["predict"]
    assert (predict.variant, predict.units) == (variant, units)
    assert predict.action == ("run" if variant == "hv" else "shrunk")
    assert result["write"].action == "run" and result["write"].units == 100  # room for write is kept first
    assert not result.over_budget


def test_mandatory_stages_over_budget_are_kept_at_their_smallest_and_marked():
    result = plan(pipeline(), available_s=3.0)
    predict, write = result["predict"], result["write"]
    assert (predict.action, predict.variant, predict.units, predict.over_budget) == ("shrunk", "none", 1, True)
    assert write.runs and write.over_budget and write.units == 100
    assert "over budget" in predict.reason
    assert result.over_budget
    assert all(d.action == "dropped" for d in result.decisions if not d.mandatory)


def test_a_stage_is_dropped_when_a_stage_it_requires_is_dropped():
    # pseudo (value 5) is funded first; the 20 s left cannot hold oof (all or nothing, 50 s), so search goes too
    result = plan(pipeline(pseudo={"value": 5.0}, oof={"min_units": None}), available_s=215.0)
    assert result["oof"].action == "dropped"
    assert result["search"].action == "dropped" and "oof" in result["search"].reason
    assert result["averaging"].action == "dropped"


def test_ties_in_value_are_funded_in_pipeline_order():
    requests = [
        StageRequest("first", 10, 1.0, min_units=10, value=1.0),
        StageRequest("second", 10, 1.0, min_units=10, value=1.0),
    ]
    assert actions(plan(requests, 15.0)) == {"first": "run", "second": "dropped"}
    assert actions(plan(requests[::-1], 15.0)) == {"second": "run", "first": "dropped"}


def test_reserve_is_kept_back():
    requests = [StageRequest("a", 10, 1.0, min_units=1)]
    result = plan(requests, 12.0, reserve_s=5.0)
    assert result["a"].units == 7


def test_measurements_update_estimates_and_replan_skips_done_stages():
    measurements = Measurements()
    measurements.add("predict/h", 50, 20.0)
    measurements.add("predict/h", 50, 30.0)  # 0.5 s per image against the estimate of 0.6
    assert measurements.seconds_per_unit("predict/h") == pytest.approx(0.5)
    assert measurements.seconds_per_unit("oof", default=7.0) == 7.0
    assert measurements.get("predict/h").rate == pytest.approx(2.0)
    predict = pipeline()[0].with_measurements(measurements)
    assert [s for _, s, _ in predict.ladder()] == pytest.approx([1.0 * 0.5 / 0.6, 0.5, 0.3 * 0.5 / 0.6])

    measurements.add("oof", 10, 2.0)  # oof is five times faster than estimated
    clock = FakeClock()
    budget = Budget(300.0, margin_s=20.0, clock=clock)
    clock.t = 150.0  # predict took 150 s: 130 s remain
    result = replan(pipeline(), measurements, budget, done={"predict"})
    assert [d.name for d in result.decisions] == ["oof", "search", "pseudo", "averaging", "write"]
    assert result.available_s == pytest.approx(130.0)
    assert result["oof"].estimated_s == pytest.approx(10.0)
    # once oof is done, search and averaging still run although oof is no longer planned
    later = replan(pipeline(), measurements, budget, done={"predict", "oof"})
    assert later["search"].runs and later["averaging"].runs


def test_budget_with_a_fake_clock():
    clock = FakeClock(100.0)
    budget = Budget(limit_s=60.0, margin_s=10.0, clock=clock)
    clock.t = 130.0
    assert budget.elapsed() == pytest.approx(30.0)
    assert budget.remaining() == pytest.approx(20.0)
    assert budget.deadline_for(5.0).at == pytest.approx(135.0)
    assert budget.deadline_for(1000.0).at == pytest.approx(150.0)  # never past the budget
    clock.t = 170.0
    assert budget.remaining() == pytest.approx(-20.0)  # no floor


def test_deadline_check_raises_once_the_clock_passes():
    clock = FakeClock(0.0)
    deadline = Deadline(10.0, clock, stage="oof")
    clock.t = 9.5
    deadline.check()
    assert deadline.left() == pytest.approx(0.5) and not deadline.passed
    clock.t = 10.5
    with pytest.raises(StageTimeout, match="oof passed its deadline by 0.5 s"):
        deadline.check()
    Deadline.unlimited(clock).check()


def test_allowance_keeps_time_for_later_mandatory_stages():
    result = plan(pipeline(), available_s=1000.0)
    assert result.allowance_s("predict", 500.0) == pytest.approx(495.0)  # all but write's 5 s
    assert result.allowance_s("oof", 500.0, overrun=1.5) == pytest.approx(75.0)  # optional: 1.5 x its 50 s
    assert result.allowance_s("oof", 40.0) == pytest.approx(35.0)
    assert result.allowance_s("write", -3.0) == 0.0


def test_timeline_records_outcomes():
    clock = FakeClock(0.0)
    result = plan(pipeline(), available_s=235.0)
    timeline = Timeline(clock)
    with timeline.stage(result["predict"]) as log:
        clock.t += 100.0
        log.units_done = 100
    deadline = Deadline(120.0, clock, "oof")
    with timeline.stage(result["oof"]) as log:
        for _ in range(50):
            deadline.check()
            clock.t += 1.0
    with timeline.stage(result["pseudo"]) as log:
        clock.t += 3.0
        raise ValueError("boom")
    timeline.dropped(result["averaging"])
    outcomes = [(lg.name, lg.outcome, lg.actual_s) for lg in timeline.logs]
    assert outcomes == [
        ("predict", "done", 100.0),
        ("oof", "stopped at deadline", 21.0),
        ("pseudo", "failed: ValueError: boom", 3.0),
        ("averaging", "dropped", 0.0),
    ]
    assert timeline.logs[1].start_s == 100.0 and timeline.logs[1].ok and not timeline.logs[2].ok
    assert "ValueError" in timeline.logs[2].error
    with pytest.raises(ValueError), timeline.stage(result["write"], suppress=False):
        raise ValueError("not hidden")
    assert timeline.logs[-1].outcome.startswith("failed")


def test_everything_is_json_serialisable():
    clock = FakeClock()
    result = plan(pipeline(), available_s=3.0)
    timeline = Timeline(clock)
    with timeline.stage(result["predict"]) as log:
        log.effect.update(dice_before=0.91, dice_after=0.92)
    measurements = Measurements()
    measurements.add("predict/none", 4, 1.0)
    text = json.dumps(
        {"plan": result.to_dict(), "stages": timeline.to_dict(), "throughput": measurements.to_dict()},
        allow_nan=False,
    )
    back = json.loads(text)
    assert back["plan"]["stages"][0]["over_budget"] is True
    assert back["stages"][0]["effect"]["dice_after"] == 0.92
    assert math.isclose(back["throughput"]["predict/none"]["seconds_per_unit"], 0.25)


@pytest.mark.parametrize(
    "fields",
    [
        {"units": -1},
        {"min_units": 11},
        {"seconds_per_unit": -1.0},
        {"seconds_per_unit": math.inf},
        {"fixed_seconds": -1.0},
        {"name": ""},
        {"shrink_steps": (Variant("x", 0.5, units=2),)},  # below min_units
        {"shrink_steps": (Variant("", 0.5),)},  # same label as the full size
        {"requires": ("a",)},
    ],
)
def test_invalid_requests_are_rejected(fields):
    with pytest.raises(ValueError):
        StageRequest(**{"name": "a", "units": 10, "seconds_per_unit": 1.0, "min_units": 5, **fields})


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        plan([StageRequest("a", 1, 1.0), StageRequest("a", 1, 1.0)], 10.0)
