"""The release gate: may a rollout be promoted? What a deploy pipeline asks agentstream.

``gate`` reads a release's latest verdict per measure (view ``release_summary``) through
``sinks.analysis.connect`` and decides:

* ``rollback`` (exit 1): some measure ``regressed``;
* ``promote`` (exit 0): every measure measured on both sides is decided (``no_difference`` or
  ``better``) and none regressed;
* ``wait`` (exit 3): measures are still ``running`` (too little evidence yet), or the release
  is announced but no window of it has been judged.

A measure neither side has a sample of (an evaluator the agent does not run) cannot be
decided and is left out of "every measure". Decisions are final (``streams.releases``), so a
``rollback`` never turns into a ``promote`` later; a ``wait`` may turn into either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from sinks.analysis import connect
from sinks.catalog import QueryError

Decision = Literal["promote", "rollback", "wait"]
EXIT_CODES: Final[dict[Decision, int]] = {"promote": 0, "rollback": 1, "wait": 3}


class UnknownRelease(QueryError):
    """The release id is neither announced nor judged in the lake."""


@dataclass(frozen=True)
class GateResult:
    """The decision on one release and the verdicts it rests on."""

    release_id: str
    decision: Decision
    reason: str
    measures: list[dict[str, Any]]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {
            "release_id": self.release_id,
            "decision": self.decision,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "measures": self.measures,
        }


def _measured(row: dict[str, Any]) -> bool:
    return bool(row["candidate_samples"] or row["baseline_samples"])


def decide(release_id: str, rows: list[dict[str, Any]]) -> GateResult:
    """The decision for ``rows`` (``release_summary`` rows of one release)."""
    regressed = [r["measure"] for r in rows if r["verdict"] == "regressed"]
    if regressed:
        return GateResult(
            release_id, "rollback", f"regressed on {', '.join(sorted(regressed))}", rows
        )
    measured = [r for r in rows if _measured(r)]
    running = [r["measure"] for r in measured if r["verdict"] == "running"]
    if not measured:
        return GateResult(release_id, "wait", "no window of the release judged yet", rows)
    if running:
        return GateResult(
            release_id, "wait", f"still running on {', '.join(sorted(running))}", rows
        )
    return GateResult(
        release_id,
        "promote",
        f"all {len(measured)} measured measures decided, none regressed",
        rows,
    )


def gate(data_dir: Path, release_id: str) -> GateResult:
    """Read the release's verdicts from the lake in ``data_dir`` and decide.

    Raises ``UnknownRelease`` (a user error) for an id the lake has never seen, naming the
    releases it knows.
    """
    con = connect(data_dir, only_for="release_summary")
    try:
        rel = con.execute(
            "SELECT * EXCLUDE (release_id) FROM release_summary WHERE release_id = ? "
            "ORDER BY measure",
            [release_id],
        )
        names = [d[0] for d in rel.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in rel.fetchall()]
        if not rows:
            known = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT release_id FROM releases UNION "
                    "SELECT DISTINCT release_id FROM release_verdicts ORDER BY 1"
                ).fetchall()
            ]
            if release_id not in known:
                listed = ", ".join(repr(k) for k in known[:10]) or "none yet"
                raise UnknownRelease(
                    f"unknown release {release_id!r} in {data_dir}: releases known: {listed} "
                    "(announce it with `agentstream release start`)"
                )
    finally:
        con.close()
    return decide(release_id, rows)
