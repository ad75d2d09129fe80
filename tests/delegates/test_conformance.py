"""One harness that every registered delegate goes through (as Nomad's driver test harness does).

It holds each delegate to the rules in ``khutulun/delegates/base.py``: apply is idempotent and replaces on a
changed spec, what it makes is found again by a fresh instance (an agent restart), list finds it when the
delegate says it can, delete removes it and can be repeated. A delegate needs a sample spec in
``conftest.SAMPLE_SPECS`` to be tested here; without one, its case fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from khutulun.config import Timeouts
from khutulun.delegates import Capabilities, Delegate, DelegateContext, delegate_classes
from khutulun.resources import Live, Resource, ResourceId, spec_hash
from tests.delegates.conftest import CONTAINER_DELEGATES

Cleanup = Callable[[Delegate, Resource | None], None]
Samples = dict[str, Callable[[Path], tuple[dict[str, Any], dict[str, Any]]]]

DELEGATES = delegate_classes()


def test_the_built_in_delegates_are_registered() -> None:
    assert {"process", "directory"} <= set(DELEGATES)


def test_every_sample_belongs_to_a_registered_delegate(sample_specs: Samples) -> None:
    assert set(sample_specs) <= set(DELEGATES), "a sample spec for a delegate that is not installed"


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.containers] if name in CONTAINER_DELEGATES
                                                 else []) for name in sorted(DELEGATES)])
async def test_delegate_conformance(name: str, sample_specs: Samples, host: str, tmp_path: Path,
                                    cleanup: Cleanup) -> None:
    if name not in sample_specs:
        pytest.fail(f"the {name!r} delegate has no sample spec: add one to SAMPLE_SPECS in tests/delegates/conftest.py")
    cls = DELEGATES[name]
    assert cls.name == name
    assert isinstance(cls.capabilities, Capabilities)
    context = DelegateContext(host=host, data_dir=tmp_path / "delegate", timeouts=Timeouts(stop=2.0))
    spec, changed_spec = sample_specs[name](tmp_path)
    assert spec_hash(spec) != spec_hash(changed_spec), "the changed sample spec must differ from the first"
    rid = ResourceId("conformance", "svc", "node", 0)
    resource = Resource(id=rid, delegate=name, host=host, spec=spec, spec_hash=spec_hash(spec))
    changed = Resource(id=rid, delegate=name, host=host, spec=changed_spec, spec_hash=spec_hash(changed_spec))

    delegate = cls(context)
    cleanup(delegate, resource)
    cleanup(delegate, changed)
    await delegate.start()
    restarted = cls(context)  # the same delegate after an agent restart
    cleanup(restarted, None)
    await restarted.start()

    live = await _apply_is_idempotent(delegate, resource)
    await _inspect_finds_it(delegate, restarted, replace(resource, handle=live.handle), live)
    recorded = await _a_changed_spec_replaces_it(delegate, changed, live)
    await _delete_removes_it(delegate, restarted, recorded)
    await delegate.close()
    await restarted.close()


async def _apply_is_idempotent(delegate: Delegate, resource: Resource) -> Live:
    live = await delegate.apply(resource, None)
    assert live.healthy, live
    assert live.spec_hash == resource.spec_hash
    again = await delegate.apply(replace(resource, handle=live.handle), live)
    assert again.healthy
    assert (again.spec_hash, again.handle) == (resource.spec_hash, live.handle)
    return live


async def _inspect_finds_it(delegate: Delegate, restarted: Delegate, recorded: Resource, live: Live) -> None:
    for instance in (delegate, restarted):
        found = await instance.inspect(recorded)
        assert found is not None and found.healthy, found
        assert (found.spec_hash, found.handle) == (recorded.spec_hash, live.handle)


async def _a_changed_spec_replaces_it(delegate: Delegate, changed: Resource, live: Live) -> Resource:
    replaced = await delegate.apply(replace(changed, handle=live.handle), live)
    assert replaced.healthy, replaced
    assert replaced.spec_hash == changed.spec_hash
    recorded = replace(changed, handle=replaced.handle)
    now = await delegate.inspect(recorded)
    assert now is not None and now.healthy
    assert now.spec_hash == changed.spec_hash
    if delegate.capabilities.list:
        listed = dict(await delegate.list())
        assert changed.id in listed
        assert listed[changed.id].spec_hash == changed.spec_hash
    return recorded


async def _delete_removes_it(delegate: Delegate, restarted: Delegate, recorded: Resource) -> None:
    live = await delegate.inspect(recorded)
    await delegate.delete(recorded, live)
    for instance in (delegate, restarted):
        gone = await instance.inspect(recorded)
        assert gone is None or not gone.healthy, gone
    if delegate.capabilities.list:
        assert recorded.id not in {rid for rid, found in await restarted.list() if found.healthy}
    await delegate.delete(recorded, live)  # again: nothing left, and no error
    await delegate.delete(recorded, None)
