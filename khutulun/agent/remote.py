"""Asking another host's agent to converge its part of a service, with the cluster's token."""

from __future__ import annotations

from typing import Any

from khutulun.agent.converge import Listener
from khutulun.client import Client
from khutulun.errors import error_from_wire

__all__ = ["converge_remote"]


async def converge_remote(api: str, token: str | None, namespace: str, service: str, purge: bool,
                          listener: Listener | None) -> list[dict[str, Any]]:
    """Stream the other agent's progress into ``listener``; answer what failed there."""
    async with Client(api, token=token, connect_timeout=5.0) as client:
        async for event in client.stream("POST", f"/v1/namespaces/{namespace}/services/{service}/converge",
                                         {"purge": purge}):
            kind = event.get("event")
            if kind == "error":
                raise error_from_wire(event["error"])
            if kind == "done":
                return list(event.get("failed") or [])
            if listener is not None:
                listener(event)
    return [{"instance": "*", "action": "converge", "outcome": "failed",
             "message": f"the agent at {api} ended without saying how its part went"}]
