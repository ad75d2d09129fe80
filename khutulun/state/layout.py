"""Where everything lives in the shared state directory: pure path functions, no I/O.

::

    <root>/VERSION                                            the layout version
    <root>/hosts/<host>.json                                  HostRecord
    <root>/ports/<host>.json                                  port reservations on that host
    <root>/namespaces/<ns>/templates/<name>                   a symlink to the current version of a template:
    <root>/namespaces/<ns>/templates/.versions/<name>/<version>/template.json    TemplateRecord
    <root>/namespaces/<ns>/templates/.versions/<name>/<version>/files/<relpath>  the bundle's files
    <root>/namespaces/<ns>/services/<svc>/service.json        ServiceRecord
    <root>/namespaces/<ns>/services/<svc>/resources/<ResourceId.filename>.json   ResourceRecord
    <root>/namespaces/<ns>/services/<svc>/events.jsonl        one Event per line
    <root>/locks/ports/<host>.lock                            the port reservations of a host
    <root>/locks/namespaces/<ns>/templates.lock               the registered templates of a namespace
    <root>/locks/namespaces/<ns>/services/<svc>/service.lock  a service: its record, resources and events
    <root>/locks/namespaces/<ns>/services/<svc>/converge.<host>.lock   one converge of a service per host

Each lock file that is waited on has a gate beside it (``<name>.gate``, see :mod:`khutulun.state.locks`).

Every function that turns a name into a path component checks the name first, so that no name given by a
user (or read from a record) can climb out of its directory. Names that begin with '.' are never valid, which
leaves that prefix to the store's own temporary and retired entries.
"""

from __future__ import annotations

import re
from pathlib import Path

from khutulun.errors import InvalidInputError
from khutulun.resources import ResourceId, check_name

__all__ = [
    "LAYOUT_VERSION",
    "artifact_file",
    "check_host_name",
    "converge_lease_file",
    "events_file",
    "host_file",
    "hosts_dir",
    "locks_dir",
    "namespace_dir",
    "namespaces_dir",
    "ports_dir",
    "ports_file",
    "ports_lock_file",
    "resource_file",
    "resources_dir",
    "service_dir",
    "service_file",
    "service_lock_file",
    "services_dir",
    "template_link",
    "template_versions_dir",
    "templates_dir",
    "templates_lock_file",
    "version_file",
    "volumes_dir",
]

LAYOUT_VERSION = "1"

# RFC 1123 labels, plus '_' inside a label (it occurs in real host names), up to 253 characters. Upper case is
# kept as given: host names are compared as the agents report them.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOST_PATTERN = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")


def check_host_name(name: str) -> str:
    if len(name) > 253 or not _HOST_PATTERN.match(name):
        raise InvalidInputError(
            f"host name {name!r} is not valid: use labels of letters, digits, '-' or '_' separated by '.', "
            "each starting and ending with a letter or digit")
    return name


def version_file(root: Path) -> Path:
    return root / "VERSION"


def hosts_dir(root: Path) -> Path:
    return root / "hosts"


def host_file(root: Path, host: str) -> Path:
    return hosts_dir(root) / f"{check_host_name(host)}.json"


def heartbeat_file(root: Path, host: str) -> Path:
    return hosts_dir(root) / f"{check_host_name(host)}.heartbeat"


def ports_dir(root: Path) -> Path:
    return root / "ports"


def ports_file(root: Path, host: str) -> Path:
    return ports_dir(root) / f"{check_host_name(host)}.json"


def namespaces_dir(root: Path) -> Path:
    return root / "namespaces"


def namespace_dir(root: Path, namespace: str) -> Path:
    return namespaces_dir(root) / check_name("namespace", namespace)


def templates_dir(root: Path, namespace: str) -> Path:
    return namespace_dir(root, namespace) / "templates"


def template_link(root: Path, namespace: str, name: str) -> Path:
    """The symlink that names the current version of a registered template."""
    return templates_dir(root, namespace) / check_name("template", name)


def template_versions_dir(root: Path, namespace: str, name: str) -> Path:
    """Where the versions of a template are kept; each is written once and never changed."""
    return templates_dir(root, namespace) / ".versions" / check_name("template", name)


def services_dir(root: Path, namespace: str) -> Path:
    return namespace_dir(root, namespace) / "services"


def service_dir(root: Path, namespace: str, service: str) -> Path:
    return services_dir(root, namespace) / check_name("service", service)


def service_file(root: Path, namespace: str, service: str) -> Path:
    return service_dir(root, namespace, service) / "service.json"


def resources_dir(root: Path, namespace: str, service: str) -> Path:
    return service_dir(root, namespace, service) / "resources"


def resource_file(root: Path, rid: ResourceId) -> Path:
    return resources_dir(root, rid.namespace, rid.service) / f"{rid.filename}.json"


def artifact_file(root: Path, namespace: str, service: str, digest: str) -> Path:
    """An artifact of a service, by the SHA-256 of its content (so the path changes when the content does)."""
    if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise InvalidInputError(f"{digest!r} is not an artifact digest")
    return service_dir(root, namespace, service) / "artifacts" / digest


def volumes_dir(root: Path) -> Path:
    """Where the ``shared`` directories of services go, inside the shared state directory."""
    return root / "volumes"


def events_file(root: Path, namespace: str, service: str) -> Path:
    return service_dir(root, namespace, service) / "events.jsonl"


def locks_dir(root: Path) -> Path:
    return root / "locks"


def service_lock_file(root: Path, namespace: str, service: str) -> Path:
    return _service_locks(root, namespace, service) / "service.lock"


def converge_lease_file(root: Path, namespace: str, service: str, host: str) -> Path:
    return _service_locks(root, namespace, service) / f"converge.{check_host_name(host)}.lock"


def ports_lock_file(root: Path, host: str) -> Path:
    return locks_dir(root) / "ports" / f"{check_host_name(host)}.lock"


def host_lock_file(root: Path, host: str) -> Path:
    return locks_dir(root) / "hosts" / f"{check_host_name(host)}.lock"


def templates_lock_file(root: Path, namespace: str) -> Path:
    return locks_dir(root) / "namespaces" / check_name("namespace", namespace) / "templates.lock"


def _service_locks(root: Path, namespace: str, service: str) -> Path:
    return (locks_dir(root) / "namespaces" / check_name("namespace", namespace) / "services"
            / check_name("service", service))
