"""Placement of many instances on many hosts: how long ``scheduler.place`` takes.

    .venv/bin/python -m benchmarks.bench_place [INSTANCES] [HOSTS] [ROUNDS]

One node template with a Redundancy count of INSTANCES, half of them under a Separation policy in groups, CPU
requests, a Placement policy by label, on HOSTS hosts with capacities and labels: the work placement does per
instance (filter, sample, score) at the size the issue names (1,000 on 30).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Mapping, Sequence

from khutulun.model import Node, NodeKind, Policy, Topology
from khutulun.scheduler import HostInfo, PortRequest, place


def no_ports(host: HostInfo, requests: Sequence[PortRequest]) -> Mapping[str, int]:
    return {}


def main() -> None:
    instances = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    host_count = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    groups = 10
    nodes = {f"web{g}": Node(f"web{g}", "khutulun.nodes.Process", ("khutulun.nodes.Process",), NodeKind.PROCESS,
                             {"command": ["x"], "cpus": 0.1, "memory": 64 * 2**20}, {}, ()) for g in range(groups)}
    policies = [Policy(f"n{g}", "khutulun.policies.Redundancy", ("khutulun.policies.Redundancy",), (f"web{g}",),
                       {"count": instances // groups}) for g in range(groups)]
    policies += [Policy(f"apart{g}", "khutulun.policies.Separation", ("khutulun.policies.Separation",),
                        (f"web{g}",), {}) for g in range(0, groups, 2) if instances // groups <= host_count]
    policies.append(Policy("zone", "khutulun.policies.Placement", ("khutulun.policies.Placement",), ("web1",),
                           {"labels": {"zone": "a"}}))
    topology = Topology("bench.yaml", nodes, policies=tuple(policies))
    hosts = [HostInfo(f"host{i:03d}", f"10.0.{i // 250}.{i % 250}", cpus=64.0, memory=256 * 2**30,
                      labels={"zone": "ab"[i % 2]}) for i in range(host_count)]
    ids = {(n, i): f"ns/svc/{n}/{i}" for n in nodes for i in range(topology.instance_count(n))}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        placement = place(topology, hosts, None, no_ports, ids, service="ns/svc")
        times.append(time.perf_counter() - started)
    spread = sorted(sum(1 for i in placement.instances if i.host == h.name) for h in hosts)
    print(f"{len(placement.instances)} instances on {host_count} hosts: median {statistics.median(times) * 1000:.1f} "
          f"ms (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}); instances per host "
          f"{spread[0]}..{spread[-1]}")


if __name__ == "__main__":
    main()
