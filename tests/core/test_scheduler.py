"""Placement: policies, capacity, stickiness, determinism, and reasons (pure: model objects, no TOSCA)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khutulun.errors import PlacementError
from khutulun.model import Node, NodeKind, Policy, Topology
from khutulun.scheduler import HostInfo, Placement, PortRequest, place

POLICY_TYPES = {"redundancy": ("khutulun.policies.Redundancy", "tosca.policies.Root"),
                "placement": ("khutulun.policies.Placement", "tosca.policies.Placement"),
                "colocation": ("khutulun.policies.Colocation", "tosca.policies.Placement"),
                "separation": ("khutulun.policies.Separation", "tosca.policies.Placement")}


def node(name: str, **properties: Any) -> Node:
    return Node(name, "khutulun.nodes.Process", ("khutulun.nodes.Process",), NodeKind.PROCESS,
                {"command": ["x"], **properties}, {}, ())


def policy(name: str, kind: str, targets: Sequence[str], **properties: Any) -> Policy:
    return Policy(name, POLICY_TYPES[kind][0], POLICY_TYPES[kind], tuple(targets), properties)


def topology(nodes: Sequence[Node], policies: Sequence[Policy] = ()) -> Topology:
    return Topology("t.yaml", {n.name: n for n in nodes}, policies=tuple(policies))


def no_ports(host: HostInfo, requests: Sequence[PortRequest]) -> Mapping[str, int]:
    return {}


def run(t: Topology, hosts: Sequence[HostInfo], prior: Placement | None = None) -> Placement:
    ids = {(n, i): f"ns/svc/{n}/{i}" for n in t.nodes for i in range(t.instance_count(n))}
    return place(t, hosts, prior, no_ports, ids, service="ns/svc")


def hosts(count: int, **kwargs: Any) -> list[HostInfo]:
    return [HostInfo(f"h{i}", f"10.0.0.{i}", **kwargs) for i in range(1, count + 1)]


def test_separation_puts_each_instance_on_its_own_host_and_says_why_it_cannot() -> None:
    t = topology([node("web")], [policy("three", "redundancy", ["web"], count=3),
                                 policy("spread", "separation", ["web"])])
    placed = run(t, hosts(3))
    assert sorted(i.host for i in placed.instances) == ["h1", "h2", "h3"]
    with pytest.raises(PlacementError, match=r"cannot place web/2: of 2 hosts, 2 already run an instance of "
                                             r"Separation policy 'spread'"):
        run(t, hosts(2))


def test_colocation_placement_rules_and_capacity() -> None:
    labelled = [HostInfo("a", "1", labels={"disk": "ssd"}), HostInfo("b", "2", labels={"disk": "hdd"}),
                HostInfo("c", "3", labels={"disk": "ssd"}, eligible=False)]
    t = topology([node("db"), node("cache")], [policy("ssd", "placement", ["db"], labels={"disk": "ssd"}),
                                               policy("together", "colocation", ["db", "cache"])])
    placed = run(t, labelled)
    assert {i.node: i.host for i in placed.instances} == {"db": "a", "cache": "a"}
    big = topology([node("big", cpus=3.0), node("small", cpus=1.0)])
    placed = run(big, [HostInfo("a", "1", cpus=2.0), HostInfo("b", "2", cpus=4.0)])
    assert placed.get("big", 0).host == "b"  # type: ignore[union-attr]
    with pytest.raises(PlacementError, match="without 8 CPUs"):
        run(topology([node("huge", cpus=8.0)]), [HostInfo("a", "1", cpus=4.0)])


def test_a_prior_host_is_kept_while_it_may_still_take_the_instance() -> None:
    t = topology([node("web")], [policy("n", "redundancy", ["web"], count=4)])
    first = run(t, hosts(3))
    again = run(t, hosts(5), first)  # two hosts joined: nothing moves
    assert [i.host for i in again.instances] == [i.host for i in first.instances]
    assert all(i.reason.startswith("kept on") for i in again.instances)
    ineligible = [HostInfo(h.name, h.address, eligible=h.name != first.instances[0].host) for h in hosts(3)]
    assert [i.host for i in run(t, ineligible, first).instances] == [i.host for i in first.instances]
    drained = [h for h in hosts(3) if h.name != first.instances[0].host]  # what a drain places on
    moved = run(t, drained, first)
    assert all(i.host != first.instances[0].host for i in moved.instances)
    assert [i.host for i in moved.instances if first.get(i.node, i.index).host != first.instances[0].host] == [  # type: ignore[union-attr]
        i.host for i in first.instances if i.host != first.instances[0].host]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_placements_keep_every_rule(data: st.DataObject) -> None:
    host_count = data.draw(st.integers(1, 8))
    cluster = [HostInfo(f"h{i}", f"a{i}", cpus=data.draw(st.sampled_from([0.0, 2.0, 8.0])),
                        labels={"zone": data.draw(st.sampled_from(["x", "y"]))},
                        eligible=data.draw(st.booleans()) or i == 0) for i in range(host_count)]
    names = [f"n{i}" for i in range(data.draw(st.integers(1, 5)))]
    nodes = [node(n, cpus=data.draw(st.sampled_from([0.0, 0.5, 1.0]))) for n in names]
    policies = [policy(f"r{n}", "redundancy", [n], count=data.draw(st.integers(1, 4))) for n in names]
    apart = data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    together = [n for n in data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True)) if n not in apart]
    zoned = data.draw(st.sampled_from([None, *names]))
    if apart:
        policies.append(policy("apart", "separation", apart))
    if together:
        policies.append(policy("together", "colocation", together))
    if zoned:
        policies.append(policy("zone", "placement", [zoned], labels={"zone": "x"}))
    t = topology(nodes, policies)
    try:
        placed = run(t, cluster)
    except PlacementError as e:
        assert str(e).startswith("cannot place ")
        return
    assert placed == run(t, cluster)  # deterministic
    by_host = {h.name: h for h in cluster}
    assert all(by_host[i.host].eligible for i in placed.instances)
    hosts_of = [i.host for i in placed.instances if i.node in apart]
    assert len(hosts_of) == len(set(hosts_of))
    assert len({i.host for i in placed.instances if i.node in together}) <= 1
    assert all(by_host[i.host].labels["zone"] == "x" for i in placed.instances if i.node == zoned)
    used: Counter[str] = Counter()
    for i in placed.instances:
        used[i.host] += t.nodes[i.node].properties.get("cpus", 0.0)
    assert all(not by_host[h].cpus or used[h] <= by_host[h].cpus + 1e-9 for h in used)
