"""A throwaway PostgreSQL server for the lake's multi-writer catalog, like the Kafka fixture:
Debian's ``postgresql`` binaries, a fresh cluster in a temporary folder, a free loopback port.

PostgreSQL refuses to run as root, so under root (CI) the server runs as the ``postgres``
user that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.broker import free_port


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


class PostgresServer:
    """A fresh cluster in a temporary folder on a free loopback port; ``stop`` and ``start``
    take it down and up again on the same port and data (a catalog outage)."""

    def __init__(self) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="agentstream-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.data, self.port = self.root / "data", free_port()
        init = [initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"]
        subprocess.run(
            [*self.as_user, *init],
            check=True,
            capture_output=True,
        )
        self.dsn = f"postgres:dbname=postgres host=127.0.0.1 port={self.port} user=postgres"

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=100"
        )
        log = str(self.root / "log")
        subprocess.run(
            [
                *self.as_user,
                self.pg_ctl,
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                log,
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        """Stop at once (``immediate``: connections cut, like a crash or a network cut)."""
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_instance() -> Iterator[PostgresServer]:
    """A running server of its own; stopped and removed afterwards."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the catalog setting (``postgres:...``) of a fresh server; stop it afterwards."""
    with postgres_instance() as server:
        yield server.dsn


def create_database(catalog: str, name: str) -> str:
    """A new database ``name`` on the server of ``catalog``; returns its catalog setting."""
    fields = dict(p.split("=", 1) for p in catalog.split(":", 1)[1].split())
    createdb = _bin("createdb")
    assert createdb is not None
    subprocess.run(
        [createdb, "-h", fields["host"], "-p", fields["port"], "-U", fields["user"], name],
        check=True,
        capture_output=True,
    )
    return catalog.replace(f"dbname={fields['dbname']}", f"dbname={name}")
