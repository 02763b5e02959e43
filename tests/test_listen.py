"""``pipeline.listen``: a port already taken is one line naming the address, for every server."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from pipeline.config import ConfigError
from pipeline.listen import listen


def test_a_taken_port_names_the_address_and_what_to_do() -> None:
    async def attempt(port: int) -> None:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        try:
            await listen(runner, "127.0.0.1", port)
        finally:
            await runner.cleanup()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            asyncio.run(attempt(port))
    message = str(err.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: ") and "\n" not in message
    assert message.endswith("pass another --port")


def test_a_free_port_serves() -> None:
    async def serve() -> int:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        try:
            await listen(runner, "127.0.0.1", 0)
            return len(runner.addresses)
        finally:
            await runner.cleanup()

    assert asyncio.run(serve()) == 1
