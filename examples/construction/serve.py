"""``gatekeeper serve`` for the examples' demos: a free port, a daemon started until
``/healthz`` answers, and stopped with SIGTERM as an operator would."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence

import aiohttp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_daemon(
    command: Sequence[str], env: Mapping[str, str], session: aiohttp.ClientSession, url: str
) -> subprocess.Popen[bytes]:
    """Run ``command`` (a ``gatekeeper serve``) and wait, up to 10 s, until ``url`` answers
    ``/healthz`` with 200. Raises ``SystemExit`` when it exits or does not answer."""
    daemon = subprocess.Popen(list(command), env=dict(env))
    for _ in range(100):
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return daemon
        except aiohttp.ClientError:
            pass
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with code {daemon.returncode}")
        await asyncio.sleep(0.1)
    raise SystemExit("the daemon did not answer /healthz within 10 s")


def stop_daemon(daemon: subprocess.Popen[bytes]) -> str | None:
    """Stop ``daemon`` with SIGTERM; a failure to report when it does not exit 0."""
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=30)
    return None if code == 0 else f"the daemon exited with code {code} on SIGTERM"
