"""The 3-way diff and its ordering (pure: no agent, no delegates)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from khutulun.instances import DesiredResource
from khutulun.plan import Action, make_plan
from khutulun.resources import Live, LiveState, ResourceId, spec_hash
from khutulun.state.records import ResourceRecord


def rid(node: str, index: int = 0) -> ResourceId:
    return ResourceId("ns", "svc", node, index)


def desired(node: str, spec: dict[str, Any], deps: tuple[str, ...] = (), restart: str = "always",
            host: str = "h1") -> DesiredResource:
    return DesiredResource(rid(node), "process", host, spec, tuple(rid(d) for d in deps), restart)


def record(node: str, spec: dict[str, Any], deps: tuple[str, ...] = (), host: str = "h1",
           state: LiveState = LiveState.RUNNING) -> ResourceRecord:
    return ResourceRecord(rid(node), "process", host, 1, spec, spec_hash(spec), state,
                          tuple(rid(d) for d in deps))


def live(spec: dict[str, Any] | None, state: LiveState = LiveState.RUNNING, exit_code: int | None = None) -> Live:
    return Live(state, spec_hash(spec) if spec is not None else None, exit_code=exit_code)


def resolve(d: DesiredResource) -> tuple[dict[str, Any], str]:
    return dict(d.spec), spec_hash(d.spec)


def actions(plan) -> dict[str, str]:
    return {s.id.node: s.action.value for s in plan.steps}


def test_a_new_service_creates_everything_in_dependency_order() -> None:
    wanted = [desired("web", {"c": 1}, ("db",)), desired("db", {"c": 2})]
    plan = make_plan("ns", "svc", 0, wanted, {}, {}, resolve)
    assert actions(plan) == {"web": "create", "db": "create"}
    layers = [[s.id.node for s in layer] for layer in plan.layers()]
    assert layers == [["db"], ["web"]]


def test_nothing_to_do_when_desired_prior_and_live_agree() -> None:
    spec = {"command": ["x"]}
    plan = make_plan("ns", "svc", 3, [desired("a", spec)], {rid("a"): record("a", spec)}, {rid("a"): live(spec)},
                     resolve)
    assert actions(plan) == {"a": "keep"} and not plan.changes and plan.revision == 3


def test_a_changed_spec_is_one_update_naming_the_field() -> None:
    old, new = {"command": ["x"], "environment": {"A": "1"}}, {"command": ["x"], "environment": {"A": "2"}}
    wanted = [desired("a", new), desired("b", old)]
    prior = {rid("a"): record("a", old), rid("b"): record("b", old)}
    plan = make_plan("ns", "svc", 1, wanted, prior, {rid("a"): live(old), rid("b"): live(old)}, resolve)
    assert actions(plan) == {"a": "update", "b": "keep"}
    assert plan.changes[0].changes == ("environment.A",)


def test_live_drift_is_repaired_even_when_the_record_agrees() -> None:
    spec, drifted = {"c": 1}, {"c": 99}
    plan = make_plan("ns", "svc", 1, [desired("a", spec)], {rid("a"): record("a", spec)}, {rid("a"): live(drifted)},
                     resolve)
    assert actions(plan) == {"a": "update"}


def test_a_dead_workload_is_created_again() -> None:
    spec = {"c": 1}
    plan = make_plan("ns", "svc", 1, [desired("a", spec)], {rid("a"): record("a", spec)}, {rid("a"): None}, resolve)
    assert actions(plan) == {"a": "create"} and "applied before" in plan.steps[0].reason


def test_restart_policies_keep_a_stopped_workload_stopped() -> None:
    spec = {"c": 1}
    prior = {rid("a"): record("a", spec)}
    stopped = {rid("a"): live(spec, LiveState.STOPPED, exit_code=0)}
    failed = {rid("a"): live(spec, LiveState.FAILED, exit_code=1)}
    assert actions(make_plan("ns", "svc", 1, [desired("a", spec, restart="never")], prior, failed, resolve)) == {
        "a": "keep"}
    assert actions(make_plan("ns", "svc", 1, [desired("a", spec, restart="on-failure")], prior, stopped,
                             resolve)) == {"a": "keep"}
    assert actions(make_plan("ns", "svc", 1, [desired("a", spec, restart="on-failure")], prior, failed,
                             resolve)) == {"a": "create"}


def test_removed_resources_are_deleted_dependents_first_and_before_any_create() -> None:
    spec = {"c": 1}
    prior = {rid("db"): record("db", spec), rid("web"): record("web", spec, ("db",))}
    plan = make_plan("ns", "svc", 2, [desired("new", spec)], prior, {}, resolve)
    steps = {s.id.node: s for s in plan.steps}
    assert actions(plan) == {"db": "delete", "web": "delete", "new": "create"}
    assert steps["web"].key in steps["db"].after
    assert {steps["db"].key, steps["web"].key} <= set(steps["new"].after)


def test_a_value_known_only_after_other_steps_makes_an_update_that_waits_for_them() -> None:
    spec = {"c": 1}

    def unknown_for_web(d: DesiredResource) -> tuple[dict[str, Any] | None, str | None]:
        return (None, None) if d.id.node == "web" else resolve(d)

    plan = make_plan("ns", "svc", 1, [desired("db", {"c": 2}), desired("web", spec, ("db",))],
                     {rid("db"): record("db", spec), rid("web"): record("web", spec, ("db",))},
                     {rid("db"): live(spec), rid("web"): live(spec)}, unknown_for_web)
    steps = {s.id.node: s for s in plan.steps}
    assert steps["db"].action is Action.UPDATE and steps["web"].action is Action.UPDATE
    assert steps["db"].key in steps["web"].after


def test_orphans_found_running_without_a_record_are_deleted() -> None:
    plan = make_plan("ns", "svc", 1, [], {}, {}, resolve, also_delete=[(rid("ghost"), "h1", "process")])
    assert actions(plan) == {"ghost": "delete"} and plan.steps[0].reason == "found running without a record"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_step_comes_after_the_steps_it_depends_on(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 12))
    names = [f"n{i}" for i in range(count)]
    wanted = []
    for i, name in enumerate(names):  # dependencies only on earlier nodes: a DAG, as the loader guarantees
        deps = tuple(data.draw(st.sets(st.sampled_from(names[:i]), max_size=3))) if i else ()
        wanted.append(desired(name, {"v": data.draw(st.integers(0, 2))}, deps))
    prior = {rid(n): record(n, {"v": data.draw(st.integers(0, 2))}) for n in names if data.draw(st.booleans())}
    alive = {rid(n): live({"v": data.draw(st.integers(0, 2))}) for n in names if data.draw(st.booleans())}
    plan = make_plan("ns", "svc", 1, wanted, prior, alive, resolve)
    position = {s.key: i for i, layer in enumerate(plan.layers()) for s in layer}
    for step in plan.changes:
        for before in step.after:
            assert position[before] < position[step.key]
    for d in wanted:  # what is kept is what agrees with the desired spec and runs
        step = next(s for s in plan.steps if s.id == d.id)
        if step.action is Action.KEEP:
            assert alive[d.id].spec_hash == spec_hash(d.spec)


def test_what_reads_a_changing_resource_is_updated_after_it_and_only_then() -> None:
    site_old, site_new = {"files": {"a": "1"}}, {"files": {"a": "2"}}
    web, other = {"command": ["serve"]}, {"command": ["other"]}
    wanted = [desired("site", site_new), replace(desired("web", web, ("site",)), reads=(rid("site"),)),
              desired("other", other, ("site",))]  # depends on site for ordering only: reads nothing of it
    prior = {rid("site"): record("site", site_old), rid("web"): record("web", web, ("site",)),
             rid("other"): record("other", other, ("site",))}
    alive = {rid("site"): live(site_old), rid("web"): live(web), rid("other"): live(other)}
    plan = make_plan("ns", "svc", 1, wanted, prior, alive, resolve)
    steps = {s.id.node: s for s in plan.steps}
    assert actions(plan) == {"site": "update", "web": "update", "other": "keep"}
    assert steps["web"].spec_hash is None and steps["site"].key in steps["web"].after
    assert steps["web"].reason.startswith("uses site/0, which changes")
