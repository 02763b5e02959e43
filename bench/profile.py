"""Summaries of a py-spy raw profile (``py-spy record --format raw --threads``).

Each line of the file is ``frame;frame;...;frame COUNT``, outermost frame first, with a
``thread (ID): NAME`` frame first when recorded with ``--threads``; a frame is
``function (file:line)``. Three views, each in percent of all samples:

* ``self``: the innermost frame, by function (where the CPU actually was);
* ``inclusive``: every function on the stack, counted once per sample (not the plumbing of
  ``PLUMBING`` and ``ENTRY``: interpreter start, CLI, event loop, thread pools);
* ``project``: the innermost frame inside agentstream's own code (``pipeline/``,
  ``streams/``, ``sinks/``), by function and line: which line of ours the time is under.

    python -m bench.profile FILE [--top 10]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

PROJECT: Final = ("pipeline/", "streams/", "sinks/")
# Plumbing every sample passes through (interpreter start, CLI, event loop, thread pools):
# left out of the inclusive view, where they would only fill the top with ~100% rows.
PLUMBING: Final = (
    "<frozen ",
    "asyncio/",
    "click/",
    "mode/",
    "threading.py",
    "concurrent/",
    "selectors.py",
)
# Frames that only start the worker: time under them alone is the event loop's, not ours.
ENTRY: Final = {
    ("pipeline/cli.py", "<module>"),
    ("pipeline/cli.py", "friendly.<locals>.wrapper"),
    ("pipeline/cli.py", "worker"),
    ("streams/app.py", "run"),
}
_FRAME: Final = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    """Sample counts of a raw py-spy profile, by view."""

    total: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    project: Counter[str] = field(default_factory=Counter)

    def top(self, view: str, n: int = 10) -> list[tuple[str, int, float]]:
        """``(name, samples, percent of all samples)`` of the ``n`` largest in ``view``."""
        counts: Counter[str] = getattr(self, view)
        total = self.total or 1
        return [(name, c, 100.0 * c / total) for name, c in counts.most_common(n)]


def _split(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m.group("func"), m.group("file"), m.group("line") or ""


def parse(lines: Iterable[str], thread: str | None = None) -> Profile:
    """Read raw collapsed stacks (of one thread name only, when ``thread`` is given)."""
    prof = Profile()
    for raw in lines:
        raw = raw.rstrip("\n")
        if not raw:
            continue
        stack, _, count_text = raw.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        name = "all"
        if frames and frames[0].startswith("thread ("):
            name = frames.pop(0)
            # "thread (0x7f..): MainThread" -> keep the name; ids differ between threads.
            name = name.split(": ", 1)[1] if ": " in name else name
        if thread is not None and name != thread:
            continue
        prof.total += count
        prof.threads[name] += count
        if not frames:
            continue
        func, file, _ = _split(frames[-1])
        prof.self_time[f"{func} ({file})"] += count
        seen = set()
        for frame in frames:
            func, file, _ = _split(frame)
            if file.startswith(PLUMBING) or (file, func) in ENTRY:
                continue
            name = f"{func} ({file})"
            if name not in seen:
                seen.add(name)
                prof.inclusive[name] += count
        for frame in reversed(frames):
            func, file, line = _split(frame)
            if file.startswith(PROJECT) and (file, func) not in ENTRY:
                prof.project[f"{func} ({file}:{line})"] += count
                break
        else:
            prof.project["(outside agentstream code)"] += count
    return prof


def load(path: Path, thread: str | None = None) -> Profile:
    """Parse the raw profile file at ``path``."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        return parse(fh, thread)


def render(prof: Profile, n: int = 10) -> str:
    """The three top-``n`` tables as text."""
    out = [f"{prof.total:,} samples"]
    out.append(
        "threads: "
        + ", ".join(
            f"{t} {100 * c / (prof.total or 1):.1f}%" for t, c in prof.threads.most_common(6)
        )
    )
    for view, title in (
        ("self", "self time (innermost frame)"),
        ("inclusive", "inclusive (on the stack)"),
        ("project", "innermost agentstream line"),
    ):
        out.append("")
        out.append(f"top {n} by {title}:")
        attr = "self_time" if view == "self" else view
        for name, _count, pct in prof.top(attr, n):
            out.append(f"  {pct:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--thread", default=None, help="only this thread (e.g. MainThread)")
    a = p.parse_args(argv)
    print(render(load(a.file, a.thread), a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
