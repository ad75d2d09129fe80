"""The podman delegate against a real Podman: the container cases, and how it finds (or starts) Podman."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import podman
import pytest

from khutulun.config import Timeouts
from khutulun.delegates import DelegateContext, procfs
from khutulun.delegates import podman as podman_delegate
from khutulun.delegates.podman import PodmanDelegate, stop_own_service
from khutulun.errors import DelegateError
from khutulun.resources import LiveState
from tests.delegates.conftest import container_spec, runtime_setting
from tests.delegates.containers import ContainerCases, MakeResource, Runtime

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def podman_client() -> Iterator[podman.PodmanClient]:
    socket = runtime_setting("KHUTULUN_PODMAN_SOCKET").removeprefix("unix://")
    client = podman.PodmanClient(base_url=f"unix://{socket}")
    yield client
    client.close()


class TestPodman(ContainerCases):
    @pytest.fixture
    def runtime(self, podman_client: podman.PodmanClient) -> Runtime:
        return Runtime("podman", PodmanDelegate, podman_client)


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Podman service answers where the delegate looks (on a machine set up for Podman)."""
    runtime_setting("KHUTULUN_PODMAN_SOCKET")
    monkeypatch.delenv(podman_delegate.SOCKET_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setattr(podman_delegate, "SYSTEM_SOCKET", str(tmp_path / "system.sock"))


async def test_it_starts_a_service_of_its_own_when_none_answers_and_an_agent_started_again_reuses_it(
        nowhere: None, tmp_path: Path, host: str, make_resource: MakeResource) -> None:
    context = DelegateContext(host=host, data_dir=tmp_path / "a-data-directory-with-a-long-name" / ("x" * 60),
                              timeouts=Timeouts(stop=2.0))
    first = PodmanDelegate(context)
    try:
        await first.start()
        record = podman_delegate._read_record(context.data_dir)
        assert record is not None and len(record.socket) < 108, record
        stat = procfs.read_stat(record.pid)
        assert stat is not None and stat.alive and stat.session_leader
        resource = make_resource(container_spec(runtime_setting("KHUTULUN_TEST_IMAGE")), delegate="podman")
        live = await first.apply(resource, None)
        assert live.state is LiveState.RUNNING
        await first.close()

        again = PodmanDelegate(context)  # the agent, started again: the same service
        await again.start()
        assert podman_delegate._read_record(context.data_dir) == record
        await again.delete(resource, live)
        await again.close()
    finally:
        await first.close()
        assert await asyncio.to_thread(stop_own_service, context.data_dir)
    assert not await asyncio.to_thread(stop_own_service, context.data_dir)


async def test_without_podman_start_says_so(nowhere: None, context: DelegateContext,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DelegateError, match=r"Podman is not installed on this host \(no `podman` in PATH\)"):
        await PodmanDelegate(context).start()


async def test_a_configured_socket_that_does_not_answer_is_an_error(context: DelegateContext, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(podman_delegate.SOCKET_VARIABLE, str(tmp_path / "podman.sock"))
    with pytest.raises(DelegateError, match=r"Podman does not answer on .*podman.sock, which "
                                            "KHUTULUN_PODMAN_SOCKET names"):
        await PodmanDelegate(context).start()
