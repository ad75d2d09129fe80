"""Settings: defaults, a file, environment variables, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from khutulun.config import load_config
from khutulun.errors import InvalidInputError


def test_defaults_live_in_the_users_data_directory(tmp_path: Path) -> None:
    config = load_config({"HOME": str(tmp_path)})
    assert config.data_dir == tmp_path / ".local/share/khutulun"
    assert config.state_dir == config.data_dir / "state"
    assert config.socket == config.data_dir / "agent.sock"
    assert config.embedded and config.agent_url == f"unix:{config.socket}"


def test_the_runtime_directory_holds_the_socket_unless_the_data_directory_moved(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert load_config(env).socket == tmp_path / "run/khutulun/agent.sock"
    moved = load_config({**env, "KHUTULUN_DATA_DIR": str(tmp_path / "elsewhere")})
    assert moved.socket == tmp_path / "elsewhere/agent.sock"


def test_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('host_name = "from-file"\nport_range = [30000, 30100]\n[timeouts]\nparse = 5\n')
    env = {"HOME": str(tmp_path), "KHUTULUN_CONFIG": str(path), "KHUTULUN_HOST_ADDRESS": "10.1.2.3"}
    config = load_config(env, host_name="from-flag")
    assert (config.host_name, config.host_address, config.port_range) == ("from-flag", "10.1.2.3", (30000, 30100))
    assert config.timeouts.parse == 5.0 and config.source == path


@pytest.mark.parametrize("content, message", [
    ("colour = 1\n", "unknown setting 'colour'"),
    ("port_range = [9, 1]\n", "port_range"),
    ("host_name = \n", "config.toml"),
])
def test_bad_settings_name_the_file_and_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        load_config({"HOME": str(tmp_path), "KHUTULUN_CONFIG": str(path)})


def test_cluster_settings_from_a_file_and_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('gossip = "10.0.0.5:7946"\nseeds = ["10.0.0.1:7946", "10.0.0.2"]\nlabels = {rack = "r2"}\n'
                    'failover_grace = 30\n')
    config = load_config({"HOME": str(tmp_path), "KHUTULUN_CONFIG": str(path)})
    assert config.seeds == ("10.0.0.1:7946", "10.0.0.2") and dict(config.labels) == {"rack": "r2"}
    assert (config.gossip, config.failover_grace) == ("10.0.0.5:7946", 30.0)
    env = {"HOME": str(tmp_path), "KHUTULUN_SEEDS": "a:1, b:2,", "KHUTULUN_LABELS": "zone=a,disk=ssd"}
    config = load_config(env)
    assert config.seeds == ("a:1", "b:2") and dict(config.labels) == {"zone": "a", "disk": "ssd"}


@pytest.mark.parametrize(("given", "expected"), [
    ("true", "default"), ("on", "default"), ("false", None), ("", None), ("239.1.2.3:9000", "239.1.2.3:9000")])
def test_discovery_is_a_switch_or_a_group(tmp_path: Path, given: str, expected: str | None) -> None:
    config = load_config({"HOME": str(tmp_path), "KHUTULUN_DISCOVERY": given})
    assert config.discovery == expected
    path = tmp_path / "config.toml"
    path.write_text("discovery = true\n")
    assert load_config({"HOME": str(tmp_path), "KHUTULUN_CONFIG": str(path)}).discovery == "default"

