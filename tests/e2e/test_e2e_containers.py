"""Containers end to end: the web-container example under Podman and Docker, a killed container restarted, and
failures that stay with the one resource they concern. Real agent, real engines, real HTTP.

The engines are the ones scripts/setup-containers started (their sockets come in KHUTULUN_PODMAN_SOCKET and
KHUTULUN_DOCKER_SOCKET); the test skips, saying why, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Agent

pytestmark = [pytest.mark.e2e, pytest.mark.containers]

EXAMPLE = ROOT / "examples" / "web-container"
IMAGE = "localhost/khutulun-example-busybox:1"
CLIENTS = {"podman": ["podman"], "docker": ["/usr/bin/docker"]}


def engine(runtime: str, *args: str, check: bool = True) -> str:
    variable = f"KHUTULUN_{runtime.upper()}_SOCKET"
    socket_path = os.environ.get(variable)
    if not socket_path:
        pytest.skip(f"{variable} is not set: run scripts/setup-containers as root (scripts/test does)")
    url = f"unix://{socket_path.removeprefix('unix://')}"
    argv = [*CLIENTS[runtime], "--url" if runtime == "podman" else "--host", url, *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr}")
    return result.stdout.strip()


def ours(runtime: str, host: str) -> list[str]:
    """Containers, running or not, that the agent of ``host`` made (by the label every one carries)."""
    return engine(runtime, "ps", "-aq", "--filter", f"label=khutulun.host={host}").split()


def image_present(runtime: str) -> bool:
    return bool(engine(runtime, "images", "-q", IMAGE))


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of the example with its image built (as its README says: ./build-rootfs first)."""
    copy = tmp_path / "web-container"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("*.tar"))
    subprocess.run([str(copy / "build-rootfs")], check=True, capture_output=True, timeout=120)
    return copy / "web-container.yaml"


@pytest.fixture
def runtime_agent(agent: Agent) -> Iterator[Agent]:
    engine("podman", "version")  # skips, before anything is deployed, on a machine without the engines
    engine("docker", "version")
    yield agent
    agent.kill()  # first, or its reconcile loop makes again what is removed below
    for runtime in ("podman", "docker"):  # what a failed test left, by the labels of this agent's host
        with contextlib.suppress(Exception):
            for container in ours(runtime, agent.host):
                engine(runtime, "rm", "-f", container, check=False)


def fetch(url: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                return str(answer.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_the_web_container_example_serves_its_page_and_destroy_leaves_nothing(
        runtime_agent: Agent, example: Path, runtime: str) -> None:
    agent = runtime_agent
    engine(runtime, "rmi", "-f", IMAGE, check=False)  # the example's own image: loaded by the deploy below
    agent.cli("deploy", str(example), "--service", "site", "--input", f"runtime={runtime}")
    url = agent.json("outputs", "site")["url"]
    assert "Hello from a Khutulun container" in fetch(url)
    status = agent.json("status", "site")
    assert {i["instance"]: (i["delegate"], i["state"]) for i in status["instances"]} == {
        "site/0": ("directory", "ready"), "web/0": (runtime, "running"), "checker/0": ("process", "running")}
    [container] = ours(runtime, agent.host)
    inspected = json.loads(engine(runtime, "inspect", container))[0]
    assert inspected["HostConfig"]["Memory"] == 64 * 2**20
    assert inspected["Config"]["Labels"]["khutulun.resource"] == "default/site/web/0"

    # The process that connects to it got the published address, and says what it was answered.
    deadline = time.monotonic() + 10
    while "answered 200" not in agent.cli("logs", "site", "checker").stdout:
        assert time.monotonic() < deadline, agent.cli("logs", "site", "checker").stdout
        time.sleep(0.2)
    assert "response:200" in agent.cli("logs", "site", "web").stdout  # busybox httpd -v, on stderr inside
    page = agent.cli("exec", "site", "web", "--", "cat", "/srv/www/index.html").stdout
    assert "Hello from a Khutulun container" in page
    plan = json.loads(agent.cli("-o", "json", "preview", str(example), "--service", "site", "--input",
                                f"runtime={runtime}").stdout)
    assert plan["plan"]["counts"] == {"create": 0, "update": 0, "delete": 0, "keep": 3}, plan

    # An agent started again adopts the container it made, and does not start another.
    agent.stop()
    agent.start()
    assert agent.json("status", "site")["instances"][2]["state"] in ("running", "ready")
    assert ours(runtime, agent.host) == [container]

    agent.cli("destroy", "site")
    assert ours(runtime, agent.host) == []
    assert image_present(runtime)  # an image Khutulun loaded is kept, unless --purge
    agent.cli("deploy", str(example), "--service", "site", "--input", f"runtime={runtime}")
    agent.cli("destroy", "site", "--purge")
    assert ours(runtime, agent.host) == [] and not image_present(runtime)
    assert not engine(runtime, "volume", "ls", "-q", "--filter", f"label=khutulun.host={agent.host}")


def test_a_killed_container_runs_again_within_three_seconds(runtime_agent: Agent, example: Path) -> None:
    agent = runtime_agent
    agent.cli("deploy", str(example), "--service", "site")
    url = agent.json("outputs", "site")["url"]
    [container] = ours("podman", agent.host)
    run = engine("podman", "inspect", "--format", "{{.State.StartedAt}}", container)

    def running_again() -> bool:  # a new run (podman kill may return before the old one is seen to end)
        started, running = engine("podman", "inspect", "--format", "{{.State.StartedAt}}|{{.State.Running}}",
                                  container).rsplit("|", 1)
        return started != run and running == "true"

    engine("podman", "kill", container)
    killed = time.monotonic()
    while not running_again():
        assert time.monotonic() - killed < 3.0, "not running again within 3 s"
        time.sleep(0.05)
    elapsed = time.monotonic() - killed
    assert "Hello" in fetch(url)
    status = agent.json("status", "site")
    web = next(i for i in status["instances"] if i["node"] == "web")
    assert web["restarts"] >= 1
    print(f"\npodman kill: running again after {elapsed:.2f} s")
    agent.cli("destroy", "site", "--purge")


def test_a_labelled_container_no_service_wants_is_removed_and_a_foreign_one_is_left(runtime_agent: Agent) -> None:
    """The reconcile loop's sweep (the same for Docker, whose delegate shares the code): a container with this
    host's labels for a service that does not exist goes; one without our labels is never touched."""
    agent = runtime_agent
    image = os.environ.get("KHUTULUN_TEST_IMAGE") or pytest.skip("KHUTULUN_TEST_IMAGE is not set")
    labels = ["--label", "khutulun.resource=default/ghost/web/0", "--label", f"khutulun.host={agent.host}",
              "--label", "khutulun.spec-hash=0"]
    ghost = engine("podman", "run", "-d", *labels, "--name", f"ghost-{agent.host}", image, "sleep", "300")
    foreign = engine("podman", "run", "-d", "--name", f"foreign-{agent.host}", image, "sleep", "300")
    try:
        deadline = time.monotonic() + 20
        while ghost in engine("podman", "ps", "-aq", "--no-trunc"):
            assert time.monotonic() < deadline, "the labelled container of no service is still there"
            time.sleep(0.2)
        assert engine("podman", "inspect", "--format", "{{.State.Running}}", foreign) == "true"
    finally:
        for container in (ghost, foreign):
            engine("podman", "rm", "-f", "-t", "0", container, check=False)


EXTRA = """
    extra:
      type: khutulun.nodes.Container
      properties:
        image: IMAGE
        command: [httpd, -f, -p, "8080", -h, /srv/www]
        stop_timeout: 1 s
      capabilities:
        endpoint:
          properties:
            target_port: 8080
            port: PORT
      requirements:
        - storage: site
ARTIFACT
  outputs:"""


def with_extra(example: Path, name: str, *, image: str = IMAGE, port: int = 0, artifact: str | None = None) -> Path:
    """The example with a second web container, ``extra``, made of the parts given."""
    files = ("      artifacts:\n        rootfs:\n          type: khutulun.artifacts.RootFilesystem\n"
             f"          file: {artifact}\n") if artifact else ""
    extra = EXTRA.replace("IMAGE", image).replace("PORT", str(port)).replace("ARTIFACT\n", files)
    path = example.with_name(f"{name}.yaml")
    path.write_text(example.read_text().replace("\n  outputs:", extra, 1))
    return path


def test_each_failure_stays_with_its_resource_and_a_fixed_template_deploys(runtime_agent: Agent,
                                                                            example: Path) -> None:
    agent = runtime_agent
    agent.cli("deploy", str(example), "--service", "site")
    url = agent.json("outputs", "site")["url"]
    [container] = ours("podman", agent.host)

    def fails_alone(template: Path, *expected: str) -> None:
        """Deploying ``template`` fails ``extra`` alone, saying ``expected``; the rest runs as it did."""
        failed = agent.cli("deploy", str(template), "--service", "site", check=False)
        said = failed.stdout + failed.stderr
        assert failed.returncode == 1 and "Traceback" not in said, said
        assert all(text in said for text in expected), said
        assert "1 step did not succeed (extra/0)" in failed.stderr, said
        states = {i["instance"]: i["state"] for i in agent.json("status", "site")["instances"]}
        assert states == {"site/0": "ready", "web/0": "running", "checker/0": "running",
                          "extra/0": "failed"}, states
        assert ours("podman", agent.host) == [container]  # the same container, never restarted
        assert "Hello" in fetch(url)

    # An image on no host, shipped with no archive.
    fails_alone(with_extra(example, "missing", image="localhost/khutulun-not-there:1"),
                "localhost/khutulun-not-there:1")
    # A port that another program holds.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        fails_alone(with_extra(example, "taken", port=taken), f"127.0.0.1:{taken}")
    # An artifact that is not an image.
    (example.parent / "notes.tar").write_text("these are notes, not an image\n")
    fails_alone(with_extra(example, "notes", image="localhost/khutulun-example-notes:1", artifact="notes.tar"),
                "artifact file 'notes.tar' is not a root filesystem archive")

    # The fixed template deploys cleanly: extra is made, the rest is kept as it is.
    fixed = agent.cli("deploy", str(with_extra(example, "fixed")), "--service", "site")
    assert re.search(r"(created|updated)\s+extra/0", fixed.stdout), fixed.stdout
    states = {i["instance"]: i["state"] for i in agent.json("status", "site")["instances"]}
    assert states.get("extra/0") in ("ready", "running") and set(states.values()) <= {"ready", "running"}, states
    assert container in ours("podman", agent.host) and len(ours("podman", agent.host)) == 2
    agent.cli("destroy", "site", "--purge")
    assert ours("podman", agent.host) == []
