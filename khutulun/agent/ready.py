"""Ready conditions: a workload counts as ready when its gate opens, and what requires it starts only then.

A gate is a ``khutulun.datatypes.ReadyCondition`` value, resolved: a TCP connect to ``target`` (host:port),
an HTTP GET of ``target`` (a URL) answered with ``status`` (and ``json_field`` equal to ``json_value`` in a
JSON answer), or a command run next to the workload, ready when it exits 0. It is checked every ``interval``
until it passes or ``timeout`` runs out; then the step fails with the gate's name and the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from khutulun.errors import DeployError, KhutulunError
from khutulun.expressions import text_of

__all__ = ["Gate", "GateError", "RunCommand", "check_once", "wait_ready"]

RunCommand = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]
"""Runs a command next to the workload; answers its exit code and the end of its output."""


class GateError(DeployError):
    """A ready condition that did not pass in time."""


@dataclass(frozen=True)
class Gate:
    what: str
    kind: str
    target: str
    command: tuple[str, ...] = ()
    status: int = 200
    json_field: str | None = None
    json_value: str | None = None
    interval: float = 1.0
    timeout: float = 60.0

    @classmethod
    def from_condition(cls, condition: Mapping[str, Any]) -> Gate:
        json_value = condition.get("json_value")
        return cls(what=str(condition["what"]), kind=str(condition["kind"]), target=str(condition.get("target") or ""),
                   command=tuple(str(a) for a in condition.get("command") or ()),
                   status=int(condition.get("status") or 200),
                   json_field=str(condition["json_field"]) if condition.get("json_field") else None,
                   json_value=text_of(json_value) if json_value is not None else None,
                   interval=max(0.05, float(condition.get("interval") or 1.0)),
                   timeout=float(condition.get("timeout") or 60.0))

    def describe(self) -> str:
        if self.kind == "tcp":
            return f"TCP connect to {self.target}"
        if self.kind == "http":
            expected = f"{self.status}" + (f" with {self.json_field} = {self.json_value!r}" if self.json_field else "")
            return f"HTTP GET {self.target} answered {expected}"
        return f"command {' '.join(self.command)!r} exiting 0"


def _field(data: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return None
    return data


async def _tcp(gate: Gate, limit: float) -> tuple[bool, str]:
    host, _, port = gate.target.rpartition(":")
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(host, int(port))
    except (OSError, TimeoutError, ValueError) as e:
        return False, f"connection failed: {e or type(e).__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "connected"


async def _http(gate: Gate, limit: float, session: aiohttp.ClientSession) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(limit), session.get(gate.target, allow_redirects=False) as answer:
            body = await answer.text(errors="replace")
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return False, f"no answer: {e or type(e).__name__}"
    said = f"{answer.status} {answer.reason or ''}".strip()
    if answer.status != gate.status:
        return False, f"{said}: {body[:200]!r}"
    if gate.json_field is None:
        return True, said
    try:
        found = _field(json.loads(body), gate.json_field)
    except json.JSONDecodeError:
        return False, f"{said}, but not JSON: {body[:200]!r}"
    if found is None or text_of(found) != gate.json_value:
        return False, f"{said}, {gate.json_field} = {None if found is None else text_of(found)!r}"
    return True, f"{said}, {gate.json_field} = {gate.json_value!r}"


async def check_once(gate: Gate, run_command: RunCommand, session: aiohttp.ClientSession) -> tuple[bool, str]:
    """One check: (passed, what was answered)."""
    limit = max(1.0, min(gate.interval, gate.timeout, 10.0))
    if gate.kind == "tcp":
        return await _tcp(gate, limit)
    if gate.kind == "http":
        return await _http(gate, limit, session)
    try:
        async with asyncio.timeout(max(limit, 10.0)):
            code, output = await run_command(gate.command)
    except TimeoutError:
        return False, "the command did not end in time"
    except KhutulunError as e:
        return False, e.message
    return code == 0, f"exit code {code}" + (f": {output.strip()[-200:]}" if output.strip() else "")


async def wait_ready(gate: Gate, run_command: RunCommand) -> str:
    """Check until the gate opens (answering how long it took) or raise GateError once ``timeout`` passed."""
    started = time.monotonic()
    deadline = started + gate.timeout
    async with aiohttp.ClientSession() as session:
        while True:
            passed, said = await check_once(gate, run_command, session)
            if passed:
                return f"ready after {time.monotonic() - started:.1f} s ({said})"
            if time.monotonic() + gate.interval > deadline:
                raise GateError(f"ready condition {gate.what} ({gate.describe()}) did not pass within "
                                f"{gate.timeout:g} s; the last answer: {said}")
            await asyncio.sleep(gate.interval)
