"""What valid templates become: the model, with functions evaluated wherever they are nested."""

from __future__ import annotations

from pathlib import Path

import pytest

from khutulun.bundle import Bundle
from khutulun.errors import TemplateError
from khutulun.model import AttributeRef, Concat, Join, NodeKind, RequirementKind
from khutulun.tosca import collect_bundle, load_bundle, load_file

ROOT = Path(__file__).resolve().parents[2]
HEAD = "tosca_definitions_version: tosca_simple_yaml_1_3\nimports: [khutulun/profile.yaml]\n"


def load_text(tmp_path: Path, text: str, inputs: dict[str, object] | None = None, name: str = "t.yaml"):
    path = tmp_path / name
    path.write_text(HEAD + text)
    return load_file(path, inputs or {})


def test_the_hello_world_example_loads_into_the_model() -> None:
    topology = load_file(ROOT / "examples" / "hello-world.yaml")
    assert list(topology.nodes) == ["site", "web", "checker"]
    site, web, checker = topology.nodes.values()
    assert (site.kind, web.kind, checker.kind) == (NodeKind.DIRECTORY, NodeKind.PROCESS, NodeKind.PROCESS)
    assert web.requirements[0].kind is RequirementKind.STORAGE and web.requirements[0].target == "site"
    assert checker.requirements[0].kind is RequirementKind.CONNECTION
    assert checker.requirements[0].capability == "endpoint"
    # an attribute where a string is declared becomes text at run time: a one-part concat
    assert web.properties["command"][4] == Concat((AttributeRef("web", "address", "endpoint"),))
    assert web.properties["command"][6] == Concat((AttributeRef("site", "path"),))
    assert web.properties["stop_timeout"] == 10.0
    assert isinstance(topology.outputs["url"].value, Concat)
    assert site.properties["files"]["index.html"].startswith("<!doctype html>")


def test_functions_are_evaluated_wherever_they_are_nested(tmp_path: Path) -> None:
    topology = load_text(tmp_path, """
topology_template:
  inputs:
    port: {type: integer, default: 8080}
    names: {type: list, entry_schema: {type: string}, default: [a, b, c]}
  node_templates:
    db:
      type: khutulun.nodes.Process
      properties:
        command: [db, {get_input: port}]
        environment: {ROLE: primary}
      capabilities:
        endpoint: {properties: {port: {get_input: port}}}
    web:
      type: khutulun.nodes.Process
      properties:
        command:
          - serve
          - {concat: ["--db-role=", {get_property: [db, environment, ROLE]}]}
          - {join: [{get_input: names}, ","]}
          - {token: ["x:y:z", ":", 1]}
          - {get_property: [db, endpoint, port]}
        environment:
          NESTED: {concat: [{get_property: [SELF, command, 0]}, "-", {get_input: [names, 2]}]}
          DB: {concat: [{get_attribute: [db, endpoint, address]}, ":", {get_attribute: [db, endpoint, port]}]}
      requirements:
        - connection: db
""", {"port": "9090"})
    db, web = topology.nodes["db"], topology.nodes["web"]
    assert db.properties["command"] == ["db", "9090"]  # an integer input where strings are declared
    assert db.capabilities["endpoint"].properties["port"] == 9090  # converted from the text given
    assert web.properties["command"] == ["serve", "--db-role=primary", "a,b,c", "y", "9090"]
    assert web.properties["environment"]["NESTED"] == "serve-c"
    assert web.properties["environment"]["DB"] == Concat((AttributeRef("db", "address", "endpoint"), ":",
                                                          AttributeRef("db", "port", "endpoint")))


def test_join_over_attributes_stays_an_expression(tmp_path: Path) -> None:
    topology = load_text(tmp_path, """
topology_template:
  node_templates:
    a:
      type: khutulun.nodes.Process
      properties:
        command: [run, {join: [[x, {get_attribute: [SELF, pid]}], "-"]}]
""")
    assert topology.nodes["a"].properties["command"][1] == Join(("x", AttributeRef("a", "pid")), "-")


def test_scalar_units_become_numbers(tmp_path: Path) -> None:
    topology = load_text(tmp_path, """
topology_template:
  node_templates:
    vm:
      type: khutulun.nodes.VirtualMachine
      properties: {memory: 1 GiB, cpus: 2}
    p:
      type: khutulun.nodes.Process
      properties: {command: [x], stop_timeout: 1.5 m}
""")
    assert topology.nodes["vm"].properties["memory"] == 1024**3
    assert topology.nodes["p"].properties["stop_timeout"] == 90.0


def test_host_follows_hosted_on_requirements(tmp_path: Path) -> None:
    topology = load_text(tmp_path, """
node_types:
  test.Server:
    derived_from: tosca.nodes.Root
    properties: {name: {type: string}}
    capabilities: {host: tosca.capabilities.Container}
  test.App:
    derived_from: tosca.nodes.Root
    properties: {server_name: {type: string}}
    requirements:
      - host: {capability: tosca.capabilities.Container, node: test.Server, relationship: tosca.relationships.HostedOn}
topology_template:
  node_templates:
    server:
      type: test.Server
      properties: {name: big-iron}
    app:
      type: test.App
      properties: {server_name: {get_property: [HOST, name]}}
      requirements: [{host: server}]
""")
    assert topology.nodes["app"].properties["server_name"] == "big-iron"
    assert topology.nodes["app"].kind is NodeKind.OTHER


def test_redundancy_policy_sets_the_instance_count(tmp_path: Path) -> None:
    topology = load_text(tmp_path, """
topology_template:
  node_templates:
    w: {type: khutulun.nodes.Process, properties: {command: [x]}}
  policies:
    - three: {type: khutulun.policies.Redundancy, properties: {count: 3}, targets: [w]}
""")
    assert topology.instance_count("w") == 3


def test_a_bundle_loads_like_the_files_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "types").mkdir()
    (tmp_path / "types" / "mine.yaml").write_text(HEAD + """
node_types:
  my.Server:
    derived_from: khutulun.nodes.Process
    properties: {flavour: {type: string, default: plain}}
""")
    (tmp_path / "main.yaml").write_text(HEAD.replace("[khutulun/profile.yaml]", "[types/mine.yaml]") + """
topology_template:
  node_templates:
    s: {type: my.Server, properties: {command: [serve]}}
""")
    bundle = collect_bundle(tmp_path / "main.yaml")
    assert set(bundle.files) == {"main.yaml", "types/mine.yaml"}
    from_bundle = load_bundle(bundle)
    from_files = load_file(tmp_path / "main.yaml")
    assert from_bundle.nodes["s"].properties == from_files.nodes["s"].properties == {
        "command": ["serve"], "flavour": "plain", "restart": "always", "stop_timeout": 10.0}


def test_imports_resolve_to_registered_templates(tmp_path: Path) -> None:
    library = tmp_path / "acme"
    library.mkdir()
    (library / "types.yaml").write_text(HEAD + """
node_types:
  acme.Worker: {derived_from: khutulun.nodes.Process}
""")
    bundle = Bundle(main="svc.yaml", files={"svc.yaml": HEAD.replace("[khutulun/profile.yaml]", "[acme/types.yaml]")
                                            + "topology_template:\n  node_templates:\n"
                                            "    w: {type: acme.Worker, properties: {command: [work]}}\n"})
    topology = load_bundle(bundle, registered={"acme": library})
    assert topology.nodes["w"].is_a("khutulun.nodes.Process")
    with pytest.raises(TemplateError, match=r"import 'acme/types\.yaml' not found"):
        load_bundle(bundle)


def test_problems_of_a_bundle_name_the_client_side_path(tmp_path: Path) -> None:
    bundle = Bundle(main="svc.yaml", root="/home/me/project", files={"svc.yaml": HEAD + "topology_template: [\n"})
    with pytest.raises(TemplateError) as caught:
        load_bundle(bundle)
    assert caught.value.problems[0].file == "/home/me/project/svc.yaml"


def test_one_load_does_not_leak_into_the_next(tmp_path: Path) -> None:
    """tosca-parser's exception collector stays 'collecting' after it crashes (P13): the next load, in
    the same loader, must not see that load's problems."""
    crashing = tmp_path / "crash.yaml"
    crashing.write_text(HEAD + """
topology_template:
  node_templates:
    w:
      type: khutulun.nodes.Process
      properties: {command: [x]}
      interfaces: {Custom: {start: x.sh}}
""")
    with pytest.raises(TemplateError):
        load_file(crashing)
    good = load_text(tmp_path, "topology_template:\n  node_templates:\n    w: {type: khutulun.nodes.Process, "
                               "properties: {command: [x]}}\n")
    assert list(good.nodes) == ["w"]


def test_a_load_that_takes_too_long_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(HEAD + "topology_template:\n  node_templates:\n" + "".join(
        f"    n{i}: {{type: khutulun.nodes.Process, properties: {{command: [x]}}}}\n" for i in range(300)))
    with pytest.raises(TemplateError, match="took longer than"):
        load_file(path, timeout=0.05)


def test_aliases_that_expand_forever_are_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TemplateError, match="expands to more than"):
        load_file(path)


def test_workflows_are_accepted_and_ignored(tmp_path: Path) -> None:
    """Valid TOSCA 1.3 that tosca-parser rejects (P1)."""
    topology = load_text(tmp_path, """
topology_template:
  node_templates:
    w: {type: khutulun.nodes.Process, properties: {command: [x]}}
  workflows:
    deploy: {steps: {}}
""")
    assert list(topology.nodes) == ["w"]
