"""Trace analysis on hand-built traces: every number below is worked out by hand from the trace."""

import dataclasses

import pytest

from tierflow.profiling import (
    Category,
    LifetimeTrace,
    Phase,
    Point,
    PointKind,
    TensorRecord,
    active_fraction,
    check_stability,
    idle_intervals,
    latest_frees,
    memory_timeline,
    top_idle_tensors,
    validate_trace,
)

K = PointKind


def _points(iteration=0, point0=0, tick0=0, extra=False):
    """START, forward pre/post of module m, optimizer pre, END; compute_s 0, 1, 2, 3, 4; ticks 0, 10, ..."""
    spec = [(K.ITERATION_START, "iteration", Phase.OTHER), (K.FORWARD_PRE, "m", Phase.FORWARD),
            (K.FORWARD_POST, "m", Phase.FORWARD), (K.OPTIMIZER_PRE, "Opt", Phase.OPTIMIZER),
            (K.ITERATION_END, "iteration", Phase.OTHER)]
    if extra:
        spec.insert(2, (K.FORWARD_PRE, "n", Phase.FORWARD))
    return [Point(kind, name, 0, iteration, phase, float(i), tick0 + 10 * i) for i, (kind, name, phase) in enumerate(spec)]


def _rec(key, cat, size, created, created_tick, freed=None, freed_tick=None, uses=(), iteration=0):
    return TensorRecord(key=key, category=cat, size_bytes=size, dtype="float32", device="cpu", iteration=iteration,
                        created=created, freed=freed, uses=tuple(uses), created_tick=created_tick, freed_tick=freed_tick)


def _hand_trace():
    """One iteration. A: a 100-byte parameter used at points 1 and 3. B: a 50-byte activation made in
    interval 1 (tick 11), used at 2, freed in interval 2 (tick 25). C: a 200-byte temporary made and
    freed inside interval 1 (ticks 12, 13). D: a 30-byte gradient made in interval 3 (tick 31)."""
    records = (
        _rec("A", Category.PARAM, 100, None, -1, uses=(1, 3), iteration=None),
        _rec("B", Category.ACTIVATION, 50, 1, 11, freed=2, freed_tick=25, uses=(2,)),
        _rec("C", Category.TEMPORARY, 200, 1, 12, freed=1, freed_tick=13),
        _rec("D", Category.GRAD, 30, 3, 31),
    )
    return LifetimeTrace(points=tuple(_points()), tensors=records, num_iterations=1, model="M", optimizer="Opt")


def test_hand_trace_is_valid():
    assert validate_trace(_hand_trace()) == []


def test_live_bytes_per_category_at_every_point():
    tl = memory_timeline(_hand_trace())
    assert [tl.bytes_at(p) for p in range(5)] == [100, 100, 150, 100, 130]
    assert [tl.bytes_at(p, Category.ACTIVATION) for p in range(5)] == [0, 0, 50, 0, 0]
    assert [tl.bytes_at(p, Category.GRAD) for p in range(5)] == [0, 0, 0, 0, 30]
    assert tl.bytes_at(1, Category.TEMPORARY) == 0  # C lives only between two points


def test_peak_inside_an_interval_is_found_with_its_breakdown():
    tl = memory_timeline(_hand_trace())
    assert tl.interval_peak_bytes == (100, 350, 150, 130, 130)
    peak = tl.peak
    assert (peak.total_bytes, peak.point, peak.tick) == (350, 1, 12)
    assert peak.bytes_of(Category.PARAM) == 100
    assert peak.bytes_of(Category.ACTIVATION) == 50
    assert peak.bytes_of(Category.TEMPORARY) == 200
    assert sum(b for _, b in peak.by_category) == 350


def test_idle_intervals_in_measured_compute_time():
    # compute_s of points 0..4 is 0, 1, 2, 3, 4; interval q lasts compute_s[q + 1].
    got = idle_intervals(_hand_trace())
    assert [(iv.key, iv.start_point, iv.end_point, iv.idle_s, iv.wraps) for iv in got] == [
        ("A", 2, 3, 3.0, False),  # A unused in interval 2 (3 s); back by point 3
        ("A", 4, 1, 1.0, True),  # from after point 3 around to point 1: interval 0 (1 s)
    ]
    assert [(iv.key, iv.start_point) for iv in idle_intervals(_hand_trace(), periodic=False)] == [("A", 2)]
    assert idle_intervals(_hand_trace(), min_points=2) == ()


def test_top_tensors_rank_by_bytes_times_idle_time():
    (top,) = top_idle_tensors(_hand_trace(), n=3)
    assert (top.key, top.category, top.size_bytes, top.idle_s, top.byte_seconds) == ("A", Category.PARAM, 100, 4.0,
                                                                                      400.0)
    with pytest.raises(ValueError, match="n=0"):
        top_idle_tensors(_hand_trace(), n=0)


def test_active_fraction_per_window():
    af = active_fraction(_hand_trace())
    # (first point, bytes touched, bytes live at any moment of the window)
    assert af.windows == ((0, 0, 100), (1, 350, 350), (2, 50, 150), (3, 130, 130))
    assert af.mean == pytest.approx((1 + 1 / 3 + 1) / 3)  # the empty window 0 ran nothing
    assert af.overall == pytest.approx(530 / 730)
    af2 = active_fraction(_hand_trace(), window=2)
    assert af2.windows == ((0, 350, 350), (2, 180, 180))
    assert af2.mean == 1.0
    with pytest.raises(ValueError, match="window=0"):
        active_fraction(_hand_trace(), window=0)


def test_validate_reports_every_problem_at_once():
    t = _hand_trace()
    pts = list(t.points)
    pts[2] = dataclasses.replace(pts[2], tick=5)  # ticks must increase
    recs = list(t.tensors)
    recs[1] = dataclasses.replace(recs[1], uses=(0,))  # used before it was created at 1
    recs[2] = dataclasses.replace(recs[2], key="B")  # same key twice in one iteration
    recs[3] = dataclasses.replace(recs[3], freed=4)  # freed point without a freed tick
    problems = validate_trace(dataclasses.replace(t, points=tuple(pts), tensors=tuple(recs)))
    assert any("point 2" in p and "does not increase" in p for p in problems)
    assert any("used at point 0 before its creation at 1" in p for p in problems)
    assert any("key repeats tensor 1" in p for p in problems)
    assert any("freed and freed_tick disagree" in p for p in problems)


def _two_iterations(size_b1=50, extra_point_in_1=False):
    """Two iterations of the hand trace's shape; B (an activation) may change size in iteration 1."""
    pts = _points(0) + _points(1, tick0=100, extra=extra_point_in_1)
    n0 = 5
    recs = [_rec("A", Category.PARAM, 100, None, -1, uses=(1, 3, n0 + 1, n0 + 3), iteration=None)]
    for i, (base, tick, size) in enumerate(((0, 0, 50), (n0, 100, size_b1))):
        recs.append(_rec("m[0]:saved0", Category.ACTIVATION, size, base + 1, tick + 11, freed=base + 2,
                         freed_tick=tick + 25, uses=(base + 2,), iteration=i))
    return LifetimeTrace(points=tuple(pts), tensors=tuple(recs), num_iterations=2)


def test_identical_iterations_are_static():
    st = check_stability(_two_iterations())
    assert st.static and st.divergence is None
    assert st.describe().startswith("static: 2 iterations")


def test_a_size_change_is_reported_at_the_point_where_the_tensor_is_born():
    st = check_stability(_two_iterations(size_b1=64))
    d = st.divergence
    assert not st.static
    assert (d.iteration, d.offset, d.point, d.key) == (1, 1, 6, "m[0]:saved0")
    assert "size_bytes 64 (iteration 0: 50)" in d.reason


def _late_temporary(freed0, freed1, cat=Category.TEMPORARY):
    """The two-iteration trace plus a 70-byte record of ``cat`` made in interval 1 of each
    iteration, used at 2, freed at offset ``freed0`` / ``freed1`` (None: after its iteration)."""
    base = _two_iterations()
    recs = list(base.tensors)
    for i, (start, tick, freed) in enumerate(((0, 0, freed0), (5, 100, freed1))):
        recs.append(_rec("m[0]:unseen0", cat, 70, start + 1, tick + 12, uses=(start + 2,), iteration=i,
                         freed=None if freed is None else start + freed,
                         freed_tick=None if freed is None else tick + 10 * freed + 5))
    return dataclasses.replace(base, tensors=tuple(recs))


def test_a_temporary_freed_later_in_one_iteration_is_planned_at_its_latest_free():
    """Note [frees that jitter]: a collective's worker thread frees its buffer a point earlier or
    later from one iteration to the next; the graph repeats, and the plan counts the latest."""
    early_last = _late_temporary(freed0=3, freed1=2)
    assert check_stability(early_last).static
    assert not check_stability(_late_temporary(3, 2, cat=Category.ACTIVATION)).static  # only temporaries
    fixed = latest_frees(early_last)
    assert validate_trace(fixed) == []
    rec = next(r for r in fixed.tensors if r.key == "m[0]:unseen0" and r.iteration == 1)
    assert (rec.freed, rec.freed_tick) == (8, 139)  # offset 3 of iteration 1, the last event of interval 8
    assert memory_timeline(fixed).interval_peak_bytes[8] == memory_timeline(early_last).interval_peak_bytes[8] + 70
    assert next(r for r in fixed.tensors if r.key == "m[0]:unseen0" and r.iteration == 0).freed == 3
    assert latest_frees(_late_temporary(2, 3)) == _late_temporary(2, 3)  # the last is the latest already
    alive = next(r for r in latest_frees(_late_temporary(None, 2)).tensors
                 if r.iteration == 1 and r.key == "m[0]:unseen0")
    assert alive.freed is None and alive.freed_tick is None


def test_a_new_point_is_reported_where_the_sequences_part():
    d = check_stability(_two_iterations(extra_point_in_1=True)).divergence
    assert (d.iteration, d.offset, d.point, d.key) == (1, 2, 7, None)
    assert "forward_pre n[0]" in d.reason and "forward_post m[0]" in d.reason
