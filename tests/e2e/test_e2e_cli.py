"""The rest of the command line against a real agent: templates, namespaces, inputs files, YAML output,
following logs, and the API on TCP with a bearer token."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import ROOT, Agent

pytestmark = pytest.mark.e2e

EXAMPLE = str(ROOT / "examples" / "hello-world.yaml")


def test_templates_are_registered_listed_fetched_deployed_and_delisted(agent: Agent, tmp_path: Path) -> None:
    agent.cli("-n", "team-a", "template", "register", "site", EXAMPLE, "--description", "the example")
    listed = agent.json("-n", "team-a", "template", "list")
    assert [(t["name"], t["main"], t["description"]) for t in listed] == [("site", "hello-world.yaml",
                                                                          "the example")]
    assert "team-a" in agent.json("namespace", "list")
    agent.cli("-n", "team-a", "template", "fetch", "site", "--output-dir", str(tmp_path / "fetched"))
    assert (tmp_path / "fetched" / "hello-world.yaml").read_text() == Path(EXAMPLE).read_text()

    deployed = agent.json("-n", "team-a", "deploy", "--template", "site", "--service", "from-registry")
    assert deployed["failed"] == [] and deployed["outputs"]["url"].startswith("http://127.0.0.1:")
    assert agent.json("-n", "team-a", "list")[0]["template"] == "site"
    assert agent.json("list") == []  # another namespace sees nothing of it
    agent.cli("-n", "team-a", "template", "delist", "site")
    assert agent.json("-n", "team-a", "template", "list") == []
    assert agent.json("-n", "team-a", "status", "from-registry")["status"] == "deployed"  # keeps running
    agent.cli("-n", "team-a", "destroy", "from-registry")


def test_an_inputs_file_and_yaml_output(agent: Agent, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.yaml"
    inputs.write_text("greeting: From a file\n")
    agent.cli("deploy", EXAMPLE, "--inputs", str(inputs), "--input", "port=0")
    status = yaml.safe_load(agent.cli("-o", "yaml", "status", "hello-world").stdout)
    assert status["status"] == "deployed" and len(status["instances"]) == 3
    url = agent.json("outputs", "hello-world")["url"]
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert "From a file" in answer.read().decode()


def test_logs_follow_prints_lines_as_they_are_written(agent: Agent) -> None:
    agent.cli("deploy", EXAMPLE)
    with subprocess.Popen([sys.executable, "-m", "khutulun.cli", "logs", "-f", "hello-world", "checker"],
                          env=agent.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=ROOT) as follower:
        try:
            assert follower.stdout is not None
            seen = [follower.stdout.readline() for _ in range(2)]  # the checker writes one line every 5 s
            assert all("answered 200" in line for line in seen), seen
        finally:
            follower.terminate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_api_on_tcp_needs_the_bearer_token(tmp_path: Path) -> None:
    port = free_port()
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    agent = Agent()
    agent.env.update(KHUTULUN_LISTEN=f"127.0.0.1:{port}", KHUTULUN_TOKEN_FILE=str(token))
    agent.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/health",
                                         headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert json.loads(answer.read())["host"] == agent.host
        remote = {"KHUTULUN_AGENT": f"http://127.0.0.1:{port}"}
        assert agent.cli("-o", "json", "list", env=remote).stdout.strip() == "[]"
        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        denied = agent.cli("list", env={**remote, "KHUTULUN_TOKEN_FILE": str(wrong)}, check=False)
        assert denied.returncode != 0 and "bearer token" in denied.stderr
    finally:
        agent.cleanup()


def test_an_agent_refuses_tcp_without_a_token_file() -> None:
    agent = Agent()
    agent.env["KHUTULUN_LISTEN"] = f"127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "khutulun.agent.main"], env=agent.env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 3 and "needs a token_file" in result.stderr
    assert not os.path.exists(agent.root / "data" / "agent.sock")
    time.sleep(0)  # nothing was started


def test_the_api_answers_a_broken_template_with_its_located_problems(agent: Agent) -> None:
    """For clients other than the CLI: POST /v1/namespaces/NS/validate, and the error format."""
    import asyncio

    from khutulun.client import Client
    from khutulun.errors import TemplateError

    example = Path(EXAMPLE).read_text()

    async def ask() -> None:
        async with Client(f"unix:{agent.root / 'data' / 'agent.sock'}") as client:
            good = await client.request("POST", "/v1/namespaces/default/validate", {
                "bundle": {"main": "t.yaml", "files": {"t.yaml": example}}})
            assert [n["name"] for n in good["nodes"]] == ["site", "web", "checker"]
            with pytest.raises(TemplateError) as caught:
                await client.request("POST", "/v1/namespaces/default/validate", {
                    "bundle": {"main": "t.yaml", "root": "/somewhere", "files": {
                        "t.yaml": "tosca_definitions_version: tosca_simple_yaml_1_3\nimports: [khutulun/profile."
                                  "yaml]\ntopology_template: {node_templates: {w: {type: khutulun.nodes.Nope}}}\n"}}})
            problem = caught.value.problems[0]
            assert (problem.file, problem.line) == ("/somewhere/t.yaml", 3)
            assert problem.message.startswith("unknown node type 'khutulun.nodes.Nope'")

    asyncio.run(ask())


def test_a_profile_registered_in_the_namespace_is_imported_by_name(agent: Agent, tmp_path: Path) -> None:
    profile = tmp_path / "acme" / "types.yaml"
    profile.parent.mkdir()
    profile.write_text("tosca_definitions_version: tosca_simple_yaml_1_3\nimports: [khutulun/profile.yaml]\n"
                       "node_types:\n  acme.Sleeper:\n    derived_from: khutulun.nodes.Process\n"
                       "    properties:\n      command: {type: list, entry_schema: {type: string},"
                       " default: [sleep, '3600']}\n")
    agent.cli("template", "register", "acme", str(profile))
    service = tmp_path / "uses-acme.yaml"
    service.write_text("tosca_definitions_version: tosca_simple_yaml_1_3\nimports: [acme/types.yaml]\n"
                       "topology_template:\n  node_templates:\n    s: {type: acme.Sleeper}\n")
    assert "is valid" in agent.cli("validate", str(service)).stdout  # the CLI reads the shared state here
    agent.cli("deploy", str(service))
    assert [w.resource for w in agent.workloads()] == ["default/uses-acme/s/0"]
    agent.cli("destroy", "uses-acme")
