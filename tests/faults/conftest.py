"""Fault tests: their figures are repeated in pytest's terminal summary."""

from __future__ import annotations

from typing import Any

from tests.faults import support


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if support.FIGURES:
        terminalreporter.section("fault injection figures")
        for figures in support.FIGURES:
            terminalreporter.write_line(figures.line())
