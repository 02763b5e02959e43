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


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the catalog setting (``postgres:...``) of a fresh server; stop it afterwards."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="agentstream-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run = [*as_user]
    subprocess.run(
        [*run, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    subprocess.run(
        [*run, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgres:dbname=postgres host=127.0.0.1 port={port} user=postgres"
    finally:
        subprocess.run(
            [*run, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


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
