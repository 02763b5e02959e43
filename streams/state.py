"""Window state that survives a restart: a snapshot saved with every offset commit.

A snapshot is written (atomically) after a flush has landed its files and before its offsets
are committed, tagged with those offsets. A crash between the two leaves a snapshot one step
ahead of the commit, so the last two are kept and the one whose offsets equal the group's
committed offsets is restored: the window state then holds exactly the events of the
committed offsets, and the replay adds the rest once.

Each worker of a group keeps its own *lineage* of snapshots (``windows~<group>~<lineage>~``):
two workers of one group must not prune or restore each other's. A restarted worker finds
its lineage by the offsets (the one snapshot saved at exactly the committed offsets of the
partitions it was given). Lineages nobody has saved to for ``STALE_AFTER_S`` are pruned.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec

from sinks.parquet import fsync_dir

log = logging.getLogger("agentstream.state")
KEEP = 2
STALE_AFTER_S = 7 * 86_400


class _Saved(msgspec.Struct, frozen=True):
    seq: int
    offsets: dict[int, int]
    state: bytes


class SnapshotStore:
    """Numbered snapshots of one consumer group's window state in ``folder``, by lineage."""

    def __init__(self, folder: Path, group: str) -> None:
        self.folder = Path(folder)
        self.prefix = f"windows~{group}~"

    def _paths(self, lineage: str | None = None) -> list[Path]:
        pattern = f"{self.prefix}{lineage}~*.snap" if lineage else f"{self.prefix}*.snap"
        return sorted(self.folder.glob(pattern))

    def _read(self, path: Path) -> _Saved | None:
        try:
            return msgspec.msgpack.decode(path.read_bytes(), type=_Saved)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("ignoring unreadable window snapshot %s: %s", path, exc)
            return None

    def save(self, state: bytes, offsets: dict[int, int], lineage: str) -> None:
        """Durably store ``state`` as ``lineage``'s state after ``offsets`` (partition -> next)."""
        mine = self._paths(lineage)
        seq = int(mine[-1].name.rsplit("~", 1)[1].split(".")[0]) + 1 if mine else 1
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}{lineage}~{seq:012d}.snap"
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.msgpack.encode(_Saved(seq, offsets, state)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)
        for old in self._paths(lineage)[:-KEEP]:
            old.unlink(missing_ok=True)
        stale = time.time() - STALE_AFTER_S
        for other in self._paths():
            try:
                if other.stat().st_mtime < stale:
                    other.unlink(missing_ok=True)
            except OSError:
                continue

    def load(self, committed: dict[int, int]) -> bytes | None:
        """The state saved at exactly the ``committed`` offsets, or None if there is none.

        ``committed`` maps every partition that has a committed offset to it. The newest such
        snapshot of any lineage wins.
        """
        found: list[tuple[float, bytes]] = []
        for path in self._paths():
            saved = self._read(path)
            if saved is not None and saved.offsets == committed:
                found.append((path.stat().st_mtime, saved.state))
        return max(found, key=lambda f: f[0])[1] if found else None
