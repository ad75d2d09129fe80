from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from khutulun import model
from khutulun.bundle import Bundle
from khutulun.errors import (
    BusyError,
    ConflictError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PlacementError,
    StateError,
)
from khutulun.resources import LiveState, ResourceId, spec_hash
from khutulun.scheduler import InstancePlacement, Placement, PortRequest
from khutulun.state import (
    Event,
    HostRecord,
    PortReservation,
    ResourceRecord,
    ServiceRecord,
    ServiceSnapshot,
    ServiceStatus,
    StateStore,
    TemplateRecord,
    layout,
)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    store = StateStore(tmp_path / "state", lock_timeout=2)
    store.initialize()
    return store


def topology() -> model.Topology:
    endpoint = model.Capability(name="http", type="khutulun.capabilities.Endpoint",
                                types=("khutulun.capabilities.Endpoint", "tosca.capabilities.Root"),
                                properties={"port": 0, "protocol": "tcp"})
    web = model.Node(
        name="web", type="khutulun.nodes.Process", types=("khutulun.nodes.Process", "tosca.nodes.Root"),
        kind=model.NodeKind.PROCESS,
        properties={
            "command": ["python3", "-m", "http.server"],
            "env": {"DB": model.Concat(("postgres://", model.AttributeRef("db", "address", "sql", ("a", 0)),
                                        ":5432"))},
            "name": model.Join(("a", model.Token(model.AttributeRef("db", "id"), ",", 1)), "-"),
            "size": 1024,
            "ratio": 0.5,
            "none": None,
        },
        capabilities={"http": endpoint},
        requirements=(model.Requirement(name="db", target="db", capability="sql",
                                        relationship="tosca.relationships.ConnectsTo",
                                        kind=model.RequirementKind.CONNECTION),),
        artifacts={"app": model.Artifact(name="app", type="tosca.artifacts.File", file="app.py",
                                         deploy_path="/srv/app.py")},
        source=model.SourceRef("main.yaml", 12, 5),
    )
    db = model.Node(name="db", type="khutulun.nodes.Container", types=("khutulun.nodes.Container",),
                    kind=model.NodeKind.CONTAINER, properties={"image": "postgres:16"}, capabilities={},
                    requirements=())
    return model.Topology(
        source="main.yaml", nodes={"web": web, "db": db}, inputs={"replicas": 2},
        outputs={"url": model.Output("url", model.Concat(("http://", model.AttributeRef("web", "address"))))},
        policies=(model.Policy("scale", "khutulun.policies.Redundancy", ("khutulun.policies.Redundancy",),
                               ("web",), {"count": 2}),),
        description="a web server and its database", metadata={"template_author": "tests"})


def service_record(name: str = "web", revision: int = 1, namespace: str = "default",
                   status: ServiceStatus = ServiceStatus.DEPLOYING) -> ServiceRecord:
    placement = Placement((
        InstancePlacement("web", 0, "host-a", "10.0.0.1", {"http": 20001}, "the only eligible host"),
        InstancePlacement("web", 1, "host-b", "10.0.0.2", {"http": 20002}),
        InstancePlacement("db", 0, "host-a", "10.0.0.1"),
    ))
    return ServiceRecord(namespace=namespace, name=name, revision=revision, status=status, topology=topology(),
                         placement=placement, inputs={"replicas": 2, "nested": {"a": [1, 2]}},
                         template_main="main.yaml", template_digest="abc", template_name="app",
                         message="", created_at=1.5, updated_at=2.5)


def resource_record(node: str = "web", index: int = 0, service: str = "web", revision: int = 1) -> ResourceRecord:
    rid = ResourceId("default", service, node, index)
    spec = {"command": ["python3"], "port": 20001}
    return ResourceRecord(id=rid, delegate="process", host="host-a", revision=revision, spec=spec,
                          spec_hash=spec_hash(spec), state=LiveState.RUNNING,
                          depends_on=(ResourceId("default", service, "db", 0),),
                          handle={"pid": 1234, "start_time": 99}, attributes={"address": "10.0.0.1"},
                          message="ok", restarts=2, started_at=3.0, updated_at=4.0)


# The directory -------------------------------------------------------------------------------------------------


def test_initialize_creates_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = StateStore(root)
    store.initialize()
    store.initialize()  # idempotent
    assert (root / "VERSION").read_text() == "1\n"
    for name in ("hosts", "ports", "namespaces", "locks"):
        assert (root / name).is_dir()
    assert store.namespaces() == ["default"]


def test_initialize_refuses_an_unknown_layout(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    (root / "VERSION").write_text("2\n")
    with pytest.raises(StateError, match="layout version '2'"):
        StateStore(root).initialize()


def test_initialize_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(StateError, match="not a Khutulun state directory"):
        StateStore(tmp_path).initialize()


def test_os_errors_are_state_errors(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.write_text("not a directory")
    store = StateStore(root)
    with pytest.raises(StateError, match="state"):
        store.initialize()
    with pytest.raises(StateError), store.service_lock("default", "web"):
        pass


# Services ------------------------------------------------------------------------------------------------------


def test_service_round_trip(store: StateStore) -> None:
    record = service_record()
    with store.service_lock("default", "web"):
        assert store.read_service("default", "web") is None
        store.write_service(record)
        assert store.read_service("default", "web") == record
    assert store.service("default", "web") == record
    assert store.services("default") == [record]
    assert store.service("default", "nothing") is None
    data = json.loads(layout.service_file(store.root, "default", "web").read_text())
    assert data["revision"] == 1
    assert data["topology"]["nodes"]["web"]["properties"]["env"]["DB"]["$expr"] == "concat"


def test_services_of_every_namespace(store: StateStore) -> None:
    records = [service_record("web"), service_record("api"), service_record("web", namespace="team-b")]
    for record in records:
        with store.service_lock(record.namespace, record.name):
            store.write_service(record)
    assert store.namespaces() == ["default", "team-b"]
    assert [r.name for r in store.services("default")] == ["api", "web"]
    assert [(r.namespace, r.name) for r in store.all_services()] == [
        ("default", "api"), ("default", "web"), ("team-b", "web")]
    assert store.services("empty") == []


def test_writing_without_the_lock_is_a_bug(store: StateStore) -> None:
    with pytest.raises(InternalError, match="default/web without holding its exclusive lock"):
        store.write_service(service_record())
    with pytest.raises(InternalError):
        store.write_resource(resource_record())
    with pytest.raises(InternalError):
        store.remove_resource(ResourceId("default", "web", "web", 0))
    with pytest.raises(InternalError):
        store.append_event("default", "web", Event(1.0, "deploy", "x"))
    with pytest.raises(InternalError):
        store.remove_service("default", "web")
    with store.service_lock("default", "web", shared=True), pytest.raises(InternalError):
        store.write_service(service_record())  # a shared lock is not enough
    with store.service_lock("default", "other"), pytest.raises(InternalError):
        store.write_service(service_record())  # nor another service's


def test_the_revision_never_goes_back(store: StateStore) -> None:
    with store.service_lock("default", "web"):
        store.write_service(service_record(revision=3))
        store.write_service(service_record(revision=3, status=ServiceStatus.DEPLOYED))  # same revision: fine
        with pytest.raises(ConflictError, match="at revision 3: refusing to write revision 2"):
            store.write_service(service_record(revision=2))
        store.write_service(service_record(revision=4))
    record = store.service("default", "web")
    assert record is not None
    assert record.revision == 4


def test_reading_a_missing_service_leaves_no_lock_file(store: StateStore) -> None:
    assert store.service("default", "ghost") is None
    assert store.resources("default", "ghost") == {}
    assert store.snapshot("default", "ghost") == ServiceSnapshot(None, {})
    assert not layout.service_lock_file(store.root, "default", "ghost").exists()


def test_remove_service(store: StateStore) -> None:
    with store.service_lock("default", "web"):
        store.write_service(service_record())
        store.write_resource(resource_record())
        store.append_event("default", "web", Event(1.0, "deploy", "revision 1"))
        store.remove_service("default", "web")
        store.remove_service("default", "web")  # already gone: nothing to do
    assert store.service("default", "web") is None
    assert store.resources("default", "web") == {}
    assert store.events("default", "web") == []
    assert list(layout.services_dir(store.root, "default").iterdir()) == []
    assert layout.service_lock_file(store.root, "default", "web").exists()  # the lock file stays


def test_sweep_removes_what_a_killed_removal_left(store: StateStore) -> None:
    services = layout.services_dir(store.root, "default")
    (services / ".web.abc123.removed" / "resources").mkdir(parents=True)
    (services / ".web.abc123.removed" / "service.json").write_text("{}")
    assert store.services("default") == []
    assert store.sweep() == 1
    assert list(services.iterdir()) == []


def test_a_shared_reader_waits_for_the_writer(store: StateStore) -> None:
    with store.service_lock("default", "web"):
        store.write_service(service_record())
    got: list[object] = []
    entered = threading.Event()

    def writer() -> None:
        with store.service_lock("default", "web"):
            entered.set()
            time.sleep(0.3)
            store.write_service(service_record(revision=2))

    thread = threading.Thread(target=writer)
    thread.start()
    assert entered.wait(5)
    record = store.service("default", "web")  # waits for the writer's critical section to end
    got.append(record.revision if record else None)
    thread.join()
    assert got == [2]


def test_a_lock_timeout_is_busy(store: StateStore) -> None:
    short = StateStore(store.root, lock_timeout=0.1)
    with store.service_lock("default", "web"):
        store.write_service(service_record())
        with pytest.raises(BusyError, match=r"the lock of service default/web"):
            short.service("default", "web")
        with pytest.raises(BusyError), short.service_lock("default", "web", timeout=0.05):
            pass


def test_bad_records_are_state_errors(store: StateStore) -> None:
    with store.service_lock("default", "web"):
        store.write_service(service_record())
    path = layout.service_file(store.root, "default", "web")
    path.write_text("[1, 2]")
    with pytest.raises(StateError, match="is not a ServiceRecord"):
        store.service("default", "web")
    path.write_text('{"namespace": "default"}')
    with pytest.raises(StateError, match="not a valid ServiceRecord"):
        store.service("default", "web")
    path.write_text("{")
    with pytest.raises(StateError, match=str(path)):
        store.service("default", "web")
    with store.service_lock("default", "web"):
        store.write_service(service_record())  # a broken record can be replaced
    other = json.loads(path.read_text())
    other["name"] = "api"
    path.write_text(json.dumps(other))
    with pytest.raises(StateError, match="names service default/api"):
        store.service("default", "web")


@pytest.mark.parametrize("bad", ["", "Web", "../etc", "a/b", ".hidden", "-x", "x" * 64])
def test_names_are_checked(store: StateStore, bad: str) -> None:
    with pytest.raises(InvalidInputError):
        store.service("default", bad)
    with pytest.raises(InvalidInputError):
        store.service(bad, "web")
    with pytest.raises(InvalidInputError):
        store.register_template("default", bad, Bundle("main.yaml", {"main.yaml": ""}))


@pytest.mark.parametrize("bad", ["", "..", "../etc", "a/b", "-host", "host-", "a..b", ".x", "x" * 254, "a b"])
def test_host_names_are_checked(store: StateStore, bad: str) -> None:
    with pytest.raises(InvalidInputError, match="host name"):
        store.host(bad)
    with pytest.raises(InvalidInputError, match="host name"):
        store.reserve_ports(bad, (20000, 20010), [])


# Resources -----------------------------------------------------------------------------------------------------


def test_resource_round_trip(store: StateStore) -> None:
    odd = resource_record(node="front end/v2%", index=3)
    records = [resource_record(), resource_record(index=1), resource_record(node="db"), odd]
    with store.service_lock("default", "web"):
        store.write_service(service_record())
        for record in records:
            store.write_resource(record)
        assert store.read_resources("default", "web") == {r.id: r for r in sorted(records, key=lambda r: r.id)}
    resources = store.resources("default", "web")
    assert list(resources) == sorted(r.id for r in records)
    assert resources[odd.id] == odd
    assert layout.resource_file(store.root, odd.id).name == "front%20end%2Fv2%25.3.json"
    snapshot = store.snapshot("default", "web")
    assert snapshot.service == service_record()
    assert snapshot.resources == resources
    with store.service_lock("default", "web"):
        store.remove_resource(odd.id)
        store.remove_resource(odd.id)  # gone already: fine
    assert odd.id not in store.resources("default", "web")


def test_a_resource_record_in_the_wrong_file_is_a_state_error(store: StateStore) -> None:
    with store.service_lock("default", "web"):
        store.write_resource(resource_record())
    directory = layout.resources_dir(store.root, "default", "web")
    (directory / "web.0.json").rename(directory / "web.7.json")
    with pytest.raises(StateError, match="is for resource default/web/web/0"):
        store.resources("default", "web")


# Events --------------------------------------------------------------------------------------------------------


def test_events_round_trip(store: StateStore) -> None:
    events = [Event(float(i), "create", f"event {i} ✓", resource=f"web/{i}", host="host-a", revision=1)
              for i in range(5)]
    with store.service_lock("default", "web"):
        for event in events:
            store.append_event("default", "web", event)
    assert store.events("default", "web") == events
    assert store.events("default", "web", limit=2) == events[-2:]
    assert store.events("default", "web", limit=0) == []
    assert store.events("default", "web", limit=50) == events
    assert store.events("default", "nothing") == []


def test_a_torn_event_line_is_skipped(store: StateStore) -> None:
    first = Event(1.0, "deploy", "revision 1")
    with store.service_lock("default", "web"):
        store.append_event("default", "web", first)
    path = layout.events_file(store.root, "default", "web")
    with path.open("ab") as f:  # what a writer killed mid-append leaves
        f.write(b'{"time":2.0,"kind":"crea')
    assert store.events("default", "web") == [first]
    second = Event(3.0, "restart", "web/0 restarted")
    with store.service_lock("default", "web"):
        store.append_event("default", "web", second)
    assert store.events("default", "web") == [first, second]
    assert path.read_bytes().count(b"\n") == 3


# Templates -----------------------------------------------------------------------------------------------------


def bundle(text: str = "tosca_definitions_version: tosca_simple_yaml_1_3\n") -> Bundle:
    return Bundle(main="main.yaml", files={"main.yaml": text, "lib/types.yaml": "types ✓\n", "x/y/z.txt": ""})


def test_template_round_trip(store: StateStore) -> None:
    record = store.register_template("default", "app", bundle(), description="the app")
    assert isinstance(record, TemplateRecord)
    assert record.files == ("lib/types.yaml", "main.yaml", "x/y/z.txt")
    assert record.digest == bundle().digest
    got, files = store.template("default", "app")
    assert got == record
    assert files == bundle()
    assert store.templates("default") == [record]
    assert store.templates("elsewhere") == []
    directory = store.template_files_dir("default", "app")
    assert (directory / "lib" / "types.yaml").read_text() == "types ✓\n"
    assert (layout.template_link(store.root, "default", "app") / "template.json").is_file()


def test_template_replace_and_delist(tmp_path: Path) -> None:
    store = StateStore(tmp_path, template_grace=3600)
    store.initialize()
    store.register_template("default", "app", bundle("one"))
    old_files = store.template_files_dir("default", "app")
    second = store.register_template("default", "app", Bundle("main.yaml", {"main.yaml": "two"}))
    record, files = store.template("default", "app")
    assert record == second
    assert files.files == {"main.yaml": "two"}
    assert (old_files / "main.yaml").read_text() == "one"  # kept for the grace, for readers that resolved it
    store.delist_template("default", "app")
    with pytest.raises(NotFoundError, match="no template 'app' in namespace 'default'"):
        store.template("default", "app")
    with pytest.raises(NotFoundError):
        store.template_files_dir("default", "app")
    with pytest.raises(NotFoundError):
        store.delist_template("default", "app")
    with pytest.raises(NotFoundError):
        store.template("nowhere", "app")
    assert store.templates("default") == []


def test_retired_template_versions_are_collected_after_the_grace(tmp_path: Path) -> None:
    store = StateStore(tmp_path, template_grace=0)
    store.initialize()
    store.register_template("default", "app", bundle("one"))
    old = store.template_files_dir("default", "app").parent
    time.sleep(0.01)
    store.register_template("default", "app", bundle("two"))
    assert not old.exists()
    versions = layout.template_versions_dir(store.root, "default", "app")
    assert len(list(versions.iterdir())) == 1
    # A version a killed writer left half made is never current, and goes the same way.
    orphan = versions / "0-dead"
    (orphan / "files").mkdir(parents=True)
    past = time.time() - 10
    os.utime(orphan, (past, past))
    assert store.sweep() == 1
    assert not orphan.exists()
    store.delist_template("default", "app")
    assert not versions.exists()


def test_template_bundles_are_normalized_and_checked(store: StateStore) -> None:
    record = store.register_template("default", "app", Bundle("./main.yaml", {"./main.yaml": "m", "a/../b.yaml": "b"}))
    assert record.main == "main.yaml"
    assert record.files == ("b.yaml", "main.yaml")
    _, files = store.template("default", "app")
    assert files.files == {"main.yaml": "m", "b.yaml": "b"}
    with pytest.raises(InvalidInputError, match="twice"):
        store.register_template("default", "app", Bundle("main.yaml", {"main.yaml": "", "./main.yaml": ""}))
    with pytest.raises(InvalidInputError, match="both as a file and as a directory"):
        store.register_template("default", "app", Bundle("main.yaml", {"main.yaml": "", "main.yaml/x": ""}))


def test_a_changed_template_file_is_detected(store: StateStore) -> None:
    store.register_template("default", "app", bundle())
    (store.template_files_dir("default", "app") / "main.yaml").write_text("tampered")
    with pytest.raises(StateError, match="do not match its digest"):
        store.template("default", "app")


# Hosts ---------------------------------------------------------------------------------------------------------


def test_host_round_trip(store: StateStore) -> None:
    hosts = [
        HostRecord(name="web-1.example.com", address="10.0.0.5", api="http://10.0.0.5:7070", cpus=4.0,
                   memory=8 << 30, labels={"zone": "a"}, eligible=False, version="0.1.0", pid=42, started_at=1.0,
                   port_range=(30000, 31000)),
        HostRecord(name="Laptop_2", address="127.0.0.1", api="unix:/run/khutulun/agent.sock"),
    ]
    for record in hosts:
        store.write_host(record)
    assert store.host("web-1.example.com") == hosts[0]
    assert store.hosts() == sorted(hosts, key=lambda h: h.name)
    assert store.host("nobody") is None
    assert store.remove_host("Laptop_2") is True
    assert store.remove_host("Laptop_2") is False
    assert store.hosts() == [hosts[0]]


def test_a_host_record_is_changed_as_it_is(store: StateStore) -> None:
    record = HostRecord(name="h1", address="10.0.0.5", api="http://10.0.0.5:7070")
    assert store.update_host("h1", lambda previous: record if previous is None else previous) == record
    drained = store.update_host("h1", lambda previous: replace(previous or record, eligible=False))
    assert store.host("h1") == drained and not drained.eligible
    with pytest.raises(InternalError):
        store.update_host("h1", lambda previous: replace(record, name="h2"))
    assert store.host("h1") == drained and store.host("h2") is None


# Ports ---------------------------------------------------------------------------------------------------------


def request(owner: str, capability: str = "http", port: int = 0, protocol: str = "tcp",
            prior: int | None = None) -> PortRequest:
    return PortRequest(owner=owner, capability=capability, port=port, protocol=protocol, prior=prior)


def test_fixed_ports(store: StateStore) -> None:
    assert store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", port=8080)]) == {"http": 8080}
    assert store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", port=8080)]) == {"http": 8080}
    with pytest.raises(PlacementError, match=r"8080/tcp on host h is held by default/a/web/0 \(endpoint http\)"):
        store.reserve_ports("h", (20000, 20100), [request("default/b/web/0", port=8080)])
    # UDP and TCP ports are separate.
    assert store.reserve_ports("h", (20000, 20100), [request("default/b/dns/0", "dns", 8080, "udp")]) == {"dns": 8080}


def test_any_port_is_stable_and_spread(store: StateStore) -> None:
    first = store.reserve_ports("h", (20000, 29999), [request("default/a/web/0"), request("default/a/web/0", "admin")])
    assert set(first) == {"http", "admin"}
    assert all(20000 <= p <= 29999 for p in first.values())
    assert first["http"] != first["admin"]
    assert store.reserve_ports("h", (20000, 29999), [request("default/a/web/0")]) == {"http": first["http"]}
    other = store.reserve_ports("h", (20000, 29999), [request("default/b/web/0")])
    assert abs(other["http"] - first["http"]) > 1  # different endpoints start their scans apart
    book = store.port_reservations("h")
    assert book[("default/a/web/0", "http")] == PortReservation("default/a/web/0", "http", first["http"], "tcp")
    assert len(book) == 3


def test_prior_ports_are_kept_when_free(store: StateStore) -> None:
    got = store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", prior=20050)])
    assert got == {"http": 20050}
    store.release_ports("h", ["default/a/web/0"])
    store.reserve_ports("h", (20000, 20100), [request("default/x/web/0", port=20050)])
    moved = store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", prior=20050)])
    assert moved["http"] != 20050  # someone else took it meanwhile
    assert store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", prior=20070)],
                               is_free=lambda port, protocol: port != 20070)["http"] != 20070


def test_is_free_is_asked_for_new_ports_only(store: StateStore) -> None:
    asked: list[tuple[int, str]] = []

    def is_free(port: int, protocol: str) -> bool:
        asked.append((port, protocol))
        return port % 2 == 0

    got = store.reserve_ports("h", (20000, 20100), [request("default/a/web/0")], is_free)
    assert got["http"] % 2 == 0
    assert all(protocol == "tcp" for _, protocol in asked)
    asked.clear()
    assert store.reserve_ports("h", (20000, 20100), [request("default/a/web/0")], is_free) == got
    assert asked == []  # its own port: its workload may be bound to it


def test_port_range_exhausted(store: StateStore) -> None:
    store.reserve_ports("h", (20000, 20001), [request("default/a/web/0"), request("default/a/web/0", "b")])
    with pytest.raises(PlacementError, match="no free tcp port in 20000-20001 on host h for default/b/web/0"):
        store.reserve_ports("h", (20000, 20001), [request("default/b/web/0")])


def test_reservations_are_all_or_nothing(store: StateStore) -> None:
    store.reserve_ports("h", (20000, 20100), [request("default/a/web/0", port=9000)])
    before = store.port_reservations("h")
    with pytest.raises(PlacementError):
        store.reserve_ports("h", (20000, 20100), [request("default/b/web/0"), request("default/b/web/0", "x", 9000)])
    assert store.port_reservations("h") == before


def test_release_ports(store: StateStore) -> None:
    store.reserve_ports("h", (20000, 20100), [request("default/a/web/0"), request("default/a/web/1")])
    store.release_ports("h", ["default/a/web/0", "default/nobody/x/0"])
    assert [key[0] for key in store.port_reservations("h")] == ["default/a/web/1"]
    store.release_ports("elsewhere", ["default/a/web/1"])  # no book: nothing to do
    assert store.port_reservations("elsewhere") == {}


def test_bad_port_requests(store: StateStore) -> None:
    with pytest.raises(InvalidInputError, match="not a range"):
        store.reserve_ports("h", (20010, 20000), [request("default/a/web/0")])
    with pytest.raises(InvalidInputError, match="not a port"):
        store.reserve_ports("h", (20000, 20010), [request("default/a/web/0", port=70000)])


# Leases --------------------------------------------------------------------------------------------------------


def test_converge_lease(store: StateStore) -> None:
    with store.converge_lease("default", "web", "host-a") as mine:
        assert mine is True
        with store.converge_lease("default", "web", "host-a") as again:
            assert again is False
        with store.converge_lease("default", "web", "host-b") as other_host:
            assert other_host is True
        with store.service_lock("default", "web", shared=True):  # a converge does not keep readers out
            pass
    with store.converge_lease("default", "web", "host-a") as mine:
        assert mine is True
