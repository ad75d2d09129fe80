"""The plan: a 3-way diff per resource, ordered as a DAG.

For every resource, three views meet: desired (the model and its placement, as a resolved spec), prior (the
record of what was last applied) and live (what its delegate finds). The result is one step per resource:

- create: desired, and nothing healthy runs (new, or gone since it was applied);
- update: desired, something runs, and it was made from a different spec;
- delete: applied before (or found carrying our markers), and no longer desired;
- keep: runs as desired, or stopped as its restart policy allows.

Steps run in dependency order: deletes first, dependents before what they depend on; then creates and
updates, what is depended on before its dependents; steps with no path between them in parallel. Pure: the
agent supplies the three views and runs the steps.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from khutulun.instances import DesiredResource
from khutulun.resources import Live, LiveState, ResourceId
from khutulun.state.records import ResourceRecord

__all__ = ["Action", "Plan", "Step", "diff_fields", "make_plan"]


class Action(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    KEEP = "keep"


@dataclass(frozen=True)
class Step:
    id: ResourceId
    host: str
    delegate: str
    action: Action
    reason: str
    after: tuple[str, ...] = ()
    """Keys of the steps that must succeed before this one starts."""
    changes: tuple[str, ...] = ()
    """The spec fields that differ from what was applied (dotted paths)."""
    spec_hash: str | None = None
    """The hash of the desired spec; None for a delete, or when it is only known after other steps (such an
    update is made only if the spec then differs from what runs)."""

    @property
    def key(self) -> str:
        return f"{self.id}@{self.host}"


@dataclass(frozen=True)
class Plan:
    namespace: str
    service: str
    revision: int
    """The service revision the plan was made against (``deploy --check-index`` compares it)."""
    steps: tuple[Step, ...]

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action is not Action.KEEP]

    def count(self, action: Action) -> int:
        return sum(1 for s in self.steps if s.action is action)

    def layers(self) -> list[list[Step]]:
        """The changing steps in waves: each wave needs only steps of earlier waves (for display)."""
        remaining = {s.key: s for s in self.changes}
        done: set[str] = set()
        out: list[list[Step]] = []
        while remaining:
            wave = [s for s in remaining.values() if all(a in done or a not in remaining for a in s.after)]
            if not wave:  # cannot happen for a plan make_plan built; never loop forever on a hand-made one
                wave = list(remaining.values())
            out.append(sorted(wave, key=lambda s: s.key))
            for s in wave:
                done.add(s.key)
                del remaining[s.key]
        return out


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted paths where two specs differ (maps are compared key by key, anything else as a whole)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(diff_fields(old[key], new[key], path))
        return out
    return [] if old == new else [prefix or "(all)"]


def _stopped_by_policy(desired: DesiredResource, prior: ResourceRecord | None, live: Live | None) -> str | None:
    """Why a resource that is not running stays stopped, if its restart policy says so."""
    if prior is None or desired.restart == "always":
        return None
    exit_code = live.exit_code if live is not None else None
    if desired.restart == "never":
        return "stopped; its restart policy is never"
    if desired.restart == "on-failure" and exit_code == 0:
        return "exited with code 0; its restart policy is on-failure"
    return None


def _deletes(desired: Mapping[ResourceId, DesiredResource], prior: Mapping[ResourceId, ResourceRecord],
             also_delete: Iterable[tuple[ResourceId, str, str]], destroying: bool) -> list[Step]:
    """A delete for what was applied and is no longer wanted (or wanted elsewhere), dependents first."""
    deletes: list[Step] = []
    for rid, old in sorted(prior.items()):
        wanted = desired.get(rid)
        if wanted is None:
            deletes.append(Step(rid, old.host, old.delegate, Action.DELETE,
                                "the service is destroyed" if destroying else "no longer in the template"))
        elif wanted.host != old.host:
            deletes.append(Step(rid, old.host, old.delegate, Action.DELETE, f"moves to {wanted.host}"))
    for rid, host, delegate in also_delete:
        if rid not in desired and rid not in prior:
            deletes.append(Step(rid, host, delegate, Action.DELETE, "found running without a record"))
    keys = {s.id: s.key for s in deletes}
    return [replace(step, after=tuple(sorted(keys[r.id] for r in prior.values()
                                             if r.id in keys and step.id in r.depends_on)))
            for step in deletes]


def _step(d: DesiredResource, record: ResourceRecord | None, found: Live | None,
          resolved: tuple[Mapping[str, Any] | None, str | None]) -> Step:
    """The step one desired resource needs, from its prior record and what runs."""
    spec, digest = resolved
    same_host = record is not None and record.host == d.host
    changes = tuple(diff_fields(record.spec, spec)) if record is not None and spec is not None else ()
    if found is None or not found.healthy:
        policy = _stopped_by_policy(d, record, found) if same_host else None
        if policy and record is not None and digest == record.spec_hash:
            action, reason = Action.KEEP, policy
        elif record is None or not same_host:
            action, reason = Action.CREATE, "new" if record is None else f"moved from {record.host}"
        else:
            state = found.message if found is not None and found.message else (
                "stopped" if found is not None and found.state is LiveState.STOPPED else "not running")
            action, reason = Action.CREATE, f"{state}; applied before"
    else:
        applied = found.spec_hash or (record.spec_hash if record is not None else None)
        if digest is None:
            action, reason = Action.UPDATE, "depends on values known only after other steps"
        elif applied != digest:
            action = Action.UPDATE
            reason = "changed: " + ", ".join(changes) if changes else "runs from a different spec"
        else:
            action, reason = Action.KEEP, "runs as desired"
    return Step(d.id, d.host, d.delegate, action, reason, changes=changes, spec_hash=digest)


def _spread(desired: Sequence[DesiredResource], planned: dict[ResourceId, Step]) -> None:
    """What reads the applied attributes of something that changes (a directory's digest, say) may change with
    it: it is updated after it, and left alone then if its spec comes out the same (spec_hash None)."""
    changing = {rid for rid, step in planned.items() if step.action is not Action.KEEP}
    spreading = True
    while spreading:
        spreading = False
        for d in desired:
            step = planned[d.id]
            source = next((r for r in d.reads if r in changing), None)
            if step.action is Action.KEEP and source is not None:
                planned[d.id] = replace(step, action=Action.UPDATE, spec_hash=None,
                                        reason=f"uses {source.instance}, which changes (kept if it comes out the same)")
                changing.add(d.id)
                spreading = True


def make_plan(namespace: str, service: str, revision: int, desired: Sequence[DesiredResource],
              prior: Mapping[ResourceId, ResourceRecord], live: Mapping[ResourceId, Live | None],
              resolve: Callable[[DesiredResource], tuple[Mapping[str, Any] | None, str | None]],
              *, also_delete: Iterable[tuple[ResourceId, str, str]] = (), destroying: bool = False) -> Plan:
    """``resolve`` gives a desired resource's spec and hash, or (None, None) when they depend on values
    only known after other steps. ``also_delete`` names resources found live with no record (orphans of a
    crash): (id, host, delegate). ``destroying`` says why everything goes."""
    by_id = {d.id: d for d in desired}
    deletes = _deletes(by_id, prior, also_delete, destroying)
    planned = {d.id: _step(d, prior.get(d.id), live.get(d.id), resolve(d)) for d in desired}
    _spread(desired, planned)
    # Deletes go first (a port or a name may pass from the old to the new); then each create or update after
    # the changing steps of what it depends on.
    all_deletes = tuple(sorted(s.key for s in deletes))
    steps: dict[str, Step] = {s.key: s for s in deletes}
    for d in desired:
        step = planned[d.id]
        if step.action is not Action.KEEP:
            needs = sorted({planned[dep].key for dep in d.depends_on
                            if dep in planned and planned[dep].action is not Action.KEEP})
            step = replace(step, after=(*needs, *all_deletes))
        steps[step.key] = step
    return Plan(namespace, service, revision, tuple(steps.values()))
