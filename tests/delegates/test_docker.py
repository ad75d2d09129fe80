"""The docker delegate against a real Docker Engine: the container cases, and a Docker that does not answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from khutulun.delegates import DelegateContext
from khutulun.delegates.docker import SOCKET_VARIABLE, DockerDelegate
from khutulun.errors import DelegateError
from tests.delegates.conftest import runtime_setting
from tests.delegates.containers import ContainerCases, Runtime

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    socket = runtime_setting("KHUTULUN_DOCKER_SOCKET").removeprefix("unix://")
    client = docker.DockerClient(base_url=f"unix://{socket}", version="auto")
    yield client
    client.close()


class TestDocker(ContainerCases):
    @pytest.fixture
    def runtime(self, docker_client: docker.DockerClient) -> Runtime:
        return Runtime("docker", DockerDelegate, docker_client)


async def test_a_docker_that_does_not_answer_is_an_error(context: DelegateContext, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOCKET_VARIABLE, f"unix://{tmp_path / 'docker.sock'}")
    with pytest.raises(DelegateError, match=r"Docker does not answer on .*docker.sock .*; start dockerd, or set "
                                            "KHUTULUN_DOCKER_SOCKET"):
        await DockerDelegate(context).start()
