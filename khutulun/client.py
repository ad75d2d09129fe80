"""A small client of the agent's API, used by the CLI.

``unix:/path/agent.sock`` or ``http://host:port`` (with a bearer token). Errors the agent answers with come
back as the same :mod:`khutulun.errors` classes; an agent that cannot be reached is an
:class:`~khutulun.errors.AgentUnavailableError`. With the embedded default, :func:`ensure_local_agent` starts
this user's agent when none answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from khutulun.config import Config
from khutulun.errors import AgentUnavailableError, InternalError, KhutulunError, error_from_wire

__all__ = ["Client", "ensure_local_agent"]


class Client:
    def __init__(self, url: str, *, token: str | None = None, connect_timeout: float = 5.0,
                 request_timeout: float = 3600.0) -> None:
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        if self.url.startswith("unix:"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.url[len("unix:"):])
            base = "http://khutulun"
        else:
            connector = aiohttp.TCPConnector()
            base = self.url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(
            base_url=base, connector=connector, headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                          sock_read=self.request_timeout))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise InternalError("the client is used outside its 'async with'")
        return self._session

    def _unavailable(self, error: Exception) -> AgentUnavailableError:
        return AgentUnavailableError(f"no agent answers at {self.url} ({error}); start one with "
                                     "'khutulun agent start' or set KHUTULUN_AGENT")

    @staticmethod
    async def _raise_for(response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        try:
            data = await response.json(content_type=None)
        except (json.JSONDecodeError, aiohttp.ContentTypeError, UnicodeDecodeError):
            text = (await response.text())[:500]
            raise KhutulunError(f"the agent answered {response.status}: {text}") from None
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            raise KhutulunError(f"the agent answered {response.status}: {data}")
        raise error_from_wire(error)

    async def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        query = {k: str(v) for k, v in params.items() if v is not None}
        try:
            async with self.session.request(method, path, json=body, params=query) as response:
                await self._raise_for(response)
                return await response.json()
        except (aiohttp.ClientError, OSError) as e:
            raise self._unavailable(e) from e
        except TimeoutError as e:
            raise AgentUnavailableError(f"the agent at {self.url} did not answer in time") from e

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, **params)

    async def stream(self, method: str, path: str, body: Any = None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """The events of an NDJSON answer, as they come."""
        query = {k: str(v) for k, v in params.items() if v is not None}
        try:
            async with self.session.request(method, path, json=body, params=query) as response:
                await self._raise_for(response)
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, OSError) as e:
            raise AgentUnavailableError(f"lost the agent at {self.url} ({type(e).__name__}); what it was doing goes "
                                        "on when it is back, and 'khutulun status' shows where it is") from e

    async def raw(self, path: str, **params: Any) -> AsyncIterator[bytes]:
        query = {k: str(v) for k, v in params.items() if v is not None}
        try:
            async with self.session.get(path, params=query) as response:
                await self._raise_for(response)
                async for chunk in response.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, OSError) as e:
            raise self._unavailable(e) from e

    async def websocket(self, path: str) -> aiohttp.ClientWebSocketResponse:
        try:
            return await self.session.ws_connect(path)
        except aiohttp.WSServerHandshakeError as e:
            raise KhutulunError(f"the agent refused the session: {e.message}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise self._unavailable(e) from e


async def _answers(url: str) -> bool:
    try:
        async with Client(url, connect_timeout=1.0, request_timeout=5.0) as client:
            await client.get("/v1/health")
    except KhutulunError:
        return False
    return True


def _new_log(config: Config, offset: int) -> str:
    try:
        with config.log_file.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


async def ensure_local_agent(config: Config) -> bool:
    """Start this user's agent if none answers on the embedded default socket; True if one was started."""
    if await _answers(config.agent_url):
        return False
    config.data_dir.mkdir(parents=True, exist_ok=True)
    offset = config.log_file.stat().st_size if config.log_file.exists() else 0
    with config.log_file.open("ab") as log:
        # Started through a shell that puts it in the background and exits: the agent is never this
        # command's child, outlives it, and has a session of its own (no terminal's Ctrl-C reaches it).
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", '"$0" "$@" &', sys.executable, "-m", "khutulun.agent.main",
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=os.environ.copy())
        await shell.wait()
    deadline = time.monotonic() + config.timeouts.agent_start
    while time.monotonic() < deadline:
        if await _answers(config.agent_url):
            return True
        said = _new_log(config, offset)
        if "khutulun-agent:" in said or "Traceback" in said:
            raise AgentUnavailableError(f"the local agent could not start; its log {config.log_file} says:\n"
                                        + said.strip()[-2000:])
        await asyncio.sleep(0.1)
    raise AgentUnavailableError(f"the local agent did not answer within {config.timeouts.agent_start:g} s; see "
                                f"{config.log_file}")
