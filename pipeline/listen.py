"""Open an aiohttp site on a user-chosen address, or say in one line why not.

The OTLP receiver and the live page both take ``--host``/``--port`` from the user; a port in use
or a host that is not this machine's is a user mistake, not a traceback.
"""

from __future__ import annotations

from aiohttp import web

from pipeline.config import ConfigError


async def listen(runner: web.AppRunner, host: str, port: int) -> None:
    """Start serving ``runner`` on ``host:port``; ConfigError naming the address if the OS refuses."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}: pass another --port"
        ) from None
