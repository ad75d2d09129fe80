"""Deploy N containers from one template, against ``podman run -d`` of the same N in a shell loop and against
``podman kube play`` of an equivalent manifest (same image, same command, same published ports).

    eval "$(scripts/setup-containers)"      # as root: Podman's service and the busybox image
    .venv/bin/python -m benchmarks.bench_containers [N] [ROUNDS]

Each container is busybox ``httpd -f -p 8080`` published on 127.0.0.1 at its own port, with an init (as the
agent runs containers) so that a stop does not wait out its grace. Every side is timed
from its command until every port answers an HTTP GET, and its teardown until no container is left. The three
sides take turns within a round, so that they meet the same machine; the ratio of the medians is printed.
Khutulun runs a real agent (its own data and state directories) with the real CLI, and Podman through the
service scripts/setup-containers started (KHUTULUN_PODMAN_SOCKET).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_deploy import wait_all
from tests.e2e.harness import Agent

FIRST_PORT = 41000  # the shell loop's and the manifest's ports: outside the agent's reserved range


def podman(*args: str, timeout: float = 600) -> str:
    socket = os.environ.get("KHUTULUN_PODMAN_SOCKET", "/run/podman/podman.sock").removeprefix("unix://")
    result = subprocess.run(["podman", "--url", f"unix://{socket}", *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def template(image: str, count: int) -> str:
    return f"""tosca_definitions_version: tosca_simple_yaml_1_3
imports: [khutulun/profile.yaml]
topology_template:
  node_templates:
    web:
      type: khutulun.nodes.Container
      properties:
        image: {image}
        command: [httpd, -f, -p, "8080", -h, /]
        stop_timeout: 2 s
      capabilities:
        endpoint:
          properties: {{target_port: 8080}}
  policies:
    - copies:
        type: khutulun.policies.Redundancy
        targets: [web]
        properties: {{count: {count}}}
"""


def manifest(image: str, count: int, prefix: str) -> str:
    pods = []
    for i in range(count):
        pods.append(f"""apiVersion: v1
kind: Pod
metadata:
  name: {prefix}-{i}
spec:
  restartPolicy: Never
  containers:
    - name: web
      image: {image}
      command: [httpd, -f, -p, "8080", -h, /]
      ports:
        - containerPort: 8080
          hostPort: {FIRST_PORT + count + i}
          hostIP: 127.0.0.1
""")
    return "---\n".join(pods)


def khutulun_round(agent: Agent, path: Path) -> tuple[float, float]:
    started = time.monotonic()
    agent.cli("deploy", str(path), timeout=600)
    ports = [int(i["ports"]["endpoint"]) for i in agent.json("status", path.stem)["instances"]]
    wait_all(ports)
    up = time.monotonic() - started
    started = time.monotonic()
    agent.cli("destroy", path.stem, timeout=600)
    return up, time.monotonic() - started


def loop_round(image: str, count: int, prefix: str) -> tuple[float, float]:
    names = [f"{prefix}-{i}" for i in range(count)]
    runs = "\n".join(f"podman --url \"$URL\" run -d --init --name {name} -p 127.0.0.1:{FIRST_PORT + i}:8080 {image} "
                     "httpd -f -p 8080 -h / >/dev/null" for i, name in enumerate(names))
    url = "unix://" + os.environ.get("KHUTULUN_PODMAN_SOCKET", "/run/podman/podman.sock").removeprefix("unix://")
    started = time.monotonic()
    subprocess.run(["bash", "-ec", runs], env={**os.environ, "URL": url}, check=True, timeout=600)
    wait_all([FIRST_PORT + i for i in range(count)])
    up = time.monotonic() - started
    started = time.monotonic()
    subprocess.run(["bash", "-ec", "\n".join(f"podman --url \"$URL\" rm -f -t 2 {name} >/dev/null"
                                             for name in names)], env={**os.environ, "URL": url}, check=True,
                   timeout=600)
    return up, time.monotonic() - started


def kube_round(image: str, count: int, prefix: str, workdir: Path) -> tuple[float, float]:
    path = workdir / f"{prefix}.yaml"
    path.write_text(manifest(image, count, prefix))
    started = time.monotonic()
    podman("kube", "play", str(path))
    wait_all([FIRST_PORT + count + i for i in range(count)])
    up = time.monotonic() - started
    started = time.monotonic()
    podman("kube", "down", str(path))
    return up, time.monotonic() - started


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    image = os.environ.get("KHUTULUN_TEST_IMAGE")
    if not image:
        sys.exit("run as root after: eval \"$(scripts/setup-containers)\" (KHUTULUN_TEST_IMAGE is not set)")
    workdir = Path(tempfile.mkdtemp(prefix="kh-bench-containers-"))
    path = workdir / "containers.yaml"
    path.write_text(template(image, count))
    agent = Agent(workdir / "agent")
    (workdir / "agent").mkdir()
    agent.start()
    results: dict[str, list[tuple[float, float]]] = {"khutulun": [], "podman run loop": [], "podman kube play": []}
    try:
        for r in range(rounds):
            prefix = f"khbench-{os.getpid()}-{r}"
            results["khutulun"].append(khutulun_round(agent, path))
            results["podman run loop"].append(loop_round(image, count, prefix + "-loop"))
            results["podman kube play"].append(kube_round(image, count, prefix + "-kube", workdir))
            print(f"round {r + 1}: " + "; ".join(f"{side} up {values[-1][0]:.2f} s, down {values[-1][1]:.2f} s"
                                                  for side, values in results.items()), flush=True)
    finally:
        agent.cleanup()
        for container in podman("ps", "-aq", "--filter", f"label=khutulun.host={agent.host}").split():
            podman("rm", "-f", container)  # what an interrupted round left of the agent's
    median = {side: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
              for side, values in results.items()}
    print(f"\n{count} containers, median of {rounds} rounds (up = command until every port answers):")
    for side, (up, down) in median.items():
        print(f"  {side:<18} up {up:6.2f} s   down {down:6.2f} s")
    ours = median["khutulun"][0]
    print(f"  khutulun / podman run loop: {ours / median['podman run loop'][0]:.2f}; "
          f"khutulun / podman kube play: {ours / median['podman kube play'][0]:.2f}")


if __name__ == "__main__":
    main()
