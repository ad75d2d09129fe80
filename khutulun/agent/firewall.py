"""Exposed endpoints: their ports opened in firewalld, and closed again when their resource goes.

What a sysadmin would type: ``firewall-cmd --zone=Z --add-port=P/tcp``, for the running firewall and, with
``--permanent``, for the next start of it as well. A host without firewalld (or with it stopped) is told
plainly, and the deploy goes on: the port is reserved and the workload runs, only not opened.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence

__all__ = ["Firewall"]

TIMEOUT = 30.0  # firewall-cmd talks to firewalld over D-Bus; a hung one must not hang a deploy


class Firewall:
    def __init__(self, zone: str) -> None:
        self.zone = zone

    async def _run(self, *args: str) -> tuple[int, str]:
        command = shutil.which("firewall-cmd")
        if command is None:
            return 127, "firewall-cmd is not installed"
        process = await asyncio.create_subprocess_exec(command, *args, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(TIMEOUT):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return 124, f"firewall-cmd did not answer within {TIMEOUT:g} s"
        return process.returncode or 0, output.decode(errors="replace").strip()

    async def unavailable(self) -> str | None:
        """Why no port can be opened here, or None when firewalld runs."""
        code, said = await self._run("--state")
        if code == 0 and said == "running":
            return None
        return said or "firewalld is not running"

    async def open(self, ports: Sequence[str]) -> str:
        """Open ``ports`` (``23456/tcp``) in the zone, now and permanently; answer what was done."""
        if not ports:
            return ""
        why = await self.unavailable()
        if why is not None:
            return f"not exposed ({', '.join(ports)}): {why}"
        for permanent in ((), ("--permanent",)):
            for port in ports:
                code, said = await self._run(*permanent, f"--zone={self.zone}", f"--add-port={port}")
                if code != 0:
                    return f"not exposed ({port}): firewall-cmd said {said!r}"
        return f"exposed {', '.join(ports)} in zone {self.zone}"

    async def close(self, ports: Sequence[str]) -> str:
        if not ports or await self.unavailable() is not None:
            return ""
        for permanent in ((), ("--permanent",)):
            for port in ports:
                await self._run(*permanent, f"--zone={self.zone}", f"--remove-port={port}")
        return f"closed {', '.join(ports)} in zone {self.zone}"
