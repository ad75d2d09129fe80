"""The client side of ``exec``: this terminal's input and output, carried over the agent's websocket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import tty as ttymod
from typing import Any

import aiohttp

from khutulun.errors import error_from_wire

__all__ = ["run_session"]


async def run_session(ws: aiohttp.ClientWebSocketResponse, argv: list[str], *, tty: bool, interactive: bool) -> int:
    """Run ``argv`` through an exec websocket; answer its exit code."""
    size = shutil.get_terminal_size()
    await ws.send_json({"argv": argv, "tty": tty, "rows": size.lines, "cols": size.columns})
    loop = asyncio.get_running_loop()
    saved: list[Any] | None = None
    stdin_fd = sys.stdin.fileno() if interactive else -1
    if tty and interactive and os.isatty(stdin_fd):
        saved = termios.tcgetattr(stdin_fd)
        ttymod.setraw(stdin_fd)

    async def send_input() -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            data = os.read(stdin_fd, 65536)
            queue.put_nowait(data)

        loop.add_reader(stdin_fd, readable)
        try:
            while data := await queue.get():
                await ws.send_bytes(data)
            await ws.send_json({"eof": True})
        finally:
            loop.remove_reader(stdin_fd)

    def resized() -> None:
        now = shutil.get_terminal_size()
        asyncio.ensure_future(ws.send_json({"resize": [now.lines, now.columns]}))  # noqa: RUF006

    feeder = asyncio.create_task(send_input()) if interactive else None
    if not interactive:
        await ws.send_json({"eof": True})
    if tty:
        loop.add_signal_handler(signal.SIGWINCH, resized)
    try:
        return await _receive(ws)
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        if tty:
            loop.remove_signal_handler(signal.SIGWINCH)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Write the command's output here until it ends; answer its exit code (255 if the agent went away)."""
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.TEXT:
            continue
        data = json.loads(message.data)
        if "error" in data:
            raise error_from_wire(data["error"])
        if "exit" in data:
            return int(data["exit"])
        target = sys.stderr.buffer if data.get("stream") == "stderr" else sys.stdout.buffer
        target.write(base64.b64decode(data["data"]))
        target.flush()
    return 255
