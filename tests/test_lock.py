"""Reproducible installs: the environment the tests run in is exactly uv.lock.

A fresh install picking up a newer release (msgspec 0.23 changed an error and turned main
red) is what the lock prevents; these checks make sure the lock is what is installed, and
that the lock still says what pyproject.toml asks for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.helpers import REPO

LOCK = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
# A universal lock may name a package twice (another version for newer Pythons).
LOCKED: dict[str, set[str]] = {}
for _package in LOCK["package"]:
    LOCKED.setdefault(_package["name"], set()).add(_package.get("version", ""))


def _uv(*args: str) -> subprocess.CompletedProcess[str]:
    uv = Path(sys.prefix) / "bin" / "uv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": sys.prefix, "UV_OFFLINE": "1"}
    return subprocess.run(
        [str(uv), *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )


def test_installed_environment_is_the_lock() -> None:
    # uv's own check: every locked package of this platform at its locked version, and the
    # lock up to date with pyproject.toml (--locked). The project itself is left out: uv
    # counts an editable install as stale whenever pyproject.toml's mtime moves.
    check = _uv(
        "sync", "--locked", "--extra", "dev", "--check", "--no-install-project", "--inexact"
    )
    assert check.returncode == 0, check.stderr
    # And independently of uv: what importlib sees installed carries the locked versions.
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
        for d in metadata.distributions()
    }
    checked = [name for name in LOCKED if name in installed and name != "agentstream"]
    assert len(checked) > 80, "the dev environment holds most of the lock"
    wrong = {n: (installed[n], LOCKED[n]) for n in checked if installed[n] not in LOCKED[n]}
    assert wrong == {}
    # Nothing installed that the lock does not name (pip and setuptools seed a 3.11 venv).
    assert set(installed) - set(LOCKED) - {"pip", "setuptools"} == set()


def test_the_uv_that_installs_is_the_locked_one() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    (pinned,) = re.findall(r"^UV_VERSION := (\S+)$", makefile, re.M)
    assert {pinned} == LOCKED["uv"]
    assert _uv("--version").stdout.split()[1] == pinned


def test_every_dependency_has_a_lower_bound() -> None:
    # An honest range starts where the project was tested; `make upgrade` moves the lock
    # within the ranges, so a dependency without a floor could be "upgraded" downwards.
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    unbounded = [d for d in deps if not re.search(r"(>=|==)", d.split(";")[0])]
    assert unbounded == []
