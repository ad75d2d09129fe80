"""Settings, read once: built-in defaults, then a TOML file, then ``KHUTULUN_*`` environment variables.

With nothing configured, everything lives under the user's data directory (``$XDG_DATA_HOME/khutulun``, by
default ``~/.local/share/khutulun``): the shared state in ``state/``, the agent's own files beside it, and
the API on a unix socket (in ``$XDG_RUNTIME_DIR/khutulun/`` when there is one). That is the embedded default
the CLI starts an agent for when none answers.

The file is ``$KHUTULUN_CONFIG``, or ``$XDG_CONFIG_HOME/khutulun/config.toml`` if it exists::

    state_dir = "/srv/khutulun"        # the directory all hosts share
    data_dir = "/var/lib/khutulun"     # this host's own files: logs, directories, the agent's pid
    socket = "/run/khutulun/agent.sock"
    listen = "10.0.0.5:7070"           # also serve the API on TCP (needs token_file)
    token_file = "/etc/khutulun/token"
    host_name = "web-1"
    host_address = "10.0.0.5"          # where this host's endpoints are reachable
    agent = "unix:/run/khutulun/agent.sock"   # the CLI's agent; "http://host:port" for a remote one
    namespace = "default"
    port_range = [20000, 32000]
    reconcile_interval = 1.0
    gossip = "10.0.0.5:7946"           # join a cluster: gossip here (needs listen, token_file, gossip_secret_file)
    seeds = ["10.0.0.1:7946"]           # or, on one network segment: discovery = true (UDP multicast)
    gossip_secret_file = "/etc/khutulun/gossip.key"
    labels = {zone = "a"}
    [timeouts]
    parse = 60.0

Each key has an environment variable: ``KHUTULUN_`` and the key in capitals (``KHUTULUN_PORT_RANGE=20000-32000``,
``KHUTULUN_TIMEOUTS_PARSE=30``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from khutulun.errors import InvalidInputError

__all__ = ["Config", "Timeouts", "load_config"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Each is applied at the call site it is named after."""

    parse: float = 60.0  # one template parse, in its worker process
    lock: float = 60.0  # waiting for a lock in the shared state
    request: float = 3600.0  # the CLI waiting for an answer from an agent (deploys can be long)
    connect: float = 5.0  # the CLI connecting to an agent
    agent_start: float = 20.0  # the CLI waiting for an agent it started to answer
    stop: float = 10.0  # stopping a workload, when its template does not say
    startup_grace: float = 0.1  # how long a new process must stay up to count as started


@dataclass(frozen=True)
class Config:
    data_dir: Path
    state_dir: Path
    socket: Path
    host_name: str
    host_address: str = "127.0.0.1"
    listen: str | None = None
    token_file: Path | None = None
    agent: str | None = None
    """Where the CLI finds its agent; None means the embedded default (this user's local agent, started on
    demand)."""
    namespace: str = "default"
    port_range: tuple[int, int] = (20000, 32000)
    reconcile_interval: float = 1.0
    restart_backoff_max: float = 30.0
    restart_backoff_reset: float = 10.0  # running this long resets a workload's backoff
    step_concurrency: int = 32
    firewall_zone: str = "public"
    """The firewalld zone exposed endpoints are opened in."""
    gossip: str | None = None
    """Where this agent's gossip listens (``host:port``); None: a cluster of this host alone, no gossip."""
    gossip_advertise: str | None = None
    """The ``host:port`` other hosts reach this one's gossip at, when ``gossip`` binds a wildcard address."""
    seeds: tuple[str, ...] = ()
    """Gossip addresses of hosts to join through."""
    discovery: str | None = None
    """Find hosts on this network segment by UDP multicast: a ``group:port``, or ``"default"`` (``true`` in the
    file) for the cluster's default group, 239.255.70.46:7947."""
    gossip_secret_file: Path | None = None
    """The cluster's gossip secret (required with ``gossip``; readable by the agent's user only)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """This host's labels, for Placement policies (``zone = "a"``; in the environment ``zone=a,disk=ssd``)."""
    failover_grace: float = 10.0
    """Seconds a host must stay dead before its instances are placed again elsewhere."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    source: Path | None = None
    """The configuration file that was read, if any."""

    @property
    def embedded(self) -> bool:
        """True when no agent was configured and the CLI may start a local one."""
        return self.agent is None

    @property
    def agent_url(self) -> str:
        return self.agent or f"unix:{self.socket}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "agent.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "agent.log"

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip()
        except OSError as e:
            raise InvalidInputError(f"cannot read the token file {str(self.token_file)!r}: {e.strerror}") from e


def _default_data_dir(env: Mapping[str, str]) -> Path:
    home = Path(env.get("HOME") or Path.home())
    data_home = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else home / ".local" / "share"
    return data_home / "khutulun"


def _default_socket(env: Mapping[str, str], data_dir: Path, default_data_dir: Path) -> Path:
    """In the user's runtime directory when there is one, unless the data directory was moved: then beside
    it, so that two agents with two data directories never share a socket."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and data_dir == default_data_dir:
        return Path(runtime) / "khutulun" / "agent.sock"
    return data_dir / "agent.sock"


def _config_file(env: Mapping[str, str]) -> Path | None:
    if env.get("KHUTULUN_CONFIG"):
        return Path(env["KHUTULUN_CONFIG"])
    home = Path(env.get("HOME") or Path.home())
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    candidate = config_home / "khutulun" / "config.toml"
    return candidate if candidate.is_file() else None


_PATHS = {"data_dir", "state_dir", "socket", "token_file", "gossip_secret_file"}
_FLOATS = {"reconcile_interval", "restart_backoff_max", "restart_backoff_reset", "failover_grace"}
_INTS = {"step_concurrency"}


def _convert(key: str, value: Any, where: str) -> Any:
    try:
        if key in _PATHS:
            return Path(str(value)).expanduser()
        if key in _FLOATS:
            return float(value)
        if key in _INTS:
            return int(value)
        if key == "discovery":
            text = str(value).strip().lower() if not isinstance(value, bool) else ("true" if value else "false")
            if text in ("", "false", "off", "no", "0"):
                return None
            return "default" if text in ("true", "on", "yes", "1") else str(value).strip()
        if key == "seeds":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if key == "labels":
            pairs = (dict(item.split("=", 1) for item in value.split(",") if item.strip())
                     if isinstance(value, str) else dict(value))
            return {str(k).strip(): str(v).strip() for k, v in pairs.items()}
        if key == "port_range":
            low, high = (value.split("-", 1) if isinstance(value, str) else value)
            low, high = int(low), int(high)
            if not 0 < low <= high <= 65535:
                raise ValueError("not a range of ports")
            return (low, high)
        if isinstance(value, (str, int, float)):
            return str(value)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"{where}: {key} = {value!r} is not valid: {e}") from e
    raise InvalidInputError(f"{where}: {key} = {value!r} is not valid")


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Read the settings for this process. ``overrides`` (from command-line options) win over everything."""
    env = os.environ if env is None else env
    default_data_dir = _default_data_dir(env)
    values: dict[str, Any] = {"data_dir": default_data_dir, "host_name": socket.gethostname()}
    timeouts: dict[str, float] = {}
    known = {f.name for f in dataclasses.fields(Config)} - {"timeouts", "source"}
    known_timeouts = {f.name for f in dataclasses.fields(Timeouts)}

    path = _config_file(env)
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise InvalidInputError(f"cannot read the configuration file {str(path)!r}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise InvalidInputError(f"{path}: {e}") from e
        for key, value in raw.items():
            if key == "timeouts" and isinstance(value, dict):
                for tkey, tvalue in value.items():
                    if tkey not in known_timeouts:
                        raise InvalidInputError(f"{path}: unknown setting timeouts.{tkey}")
                    timeouts[tkey] = float(tvalue)
            elif key in known:
                values[key] = _convert(key, value, str(path))
            else:
                raise InvalidInputError(f"{path}: unknown setting {key!r}")

    for key in known:
        name = "KHUTULUN_" + key.upper()
        if env.get(name):
            values[key] = _convert(key, env[name], f"${name}")
    for key in known_timeouts:
        name = "KHUTULUN_TIMEOUTS_" + key.upper()
        if env.get(name):
            try:
                timeouts[key] = float(env[name])
            except ValueError as e:
                raise InvalidInputError(f"${name} = {env[name]!r} is not a number of seconds") from e

    for key, value in overrides.items():
        if value is not None:
            values[key] = _convert(key, value, "command line") if key != "timeouts" else value
    values.setdefault("state_dir", Path(values["data_dir"]) / "state")
    values.setdefault("socket", _default_socket(env, Path(values["data_dir"]), default_data_dir))
    return Config(**values, timeouts=Timeouts(**timeouts), source=path)
