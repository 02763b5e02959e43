"""Window state that survives a restart: a snapshot saved with every offset commit.

A snapshot is written (atomically) after a flush has landed its files and before its offsets
are committed, tagged with those offsets. A crash between the two leaves a snapshot one step
ahead of the commit, so the last two are kept and the one whose offsets equal the group's
committed offsets is restored: the window state then holds exactly the events of the
committed offsets, and the replay adds the rest once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from sinks.parquet import fsync_dir

log = logging.getLogger("agentstream.state")
KEEP = 2


class _Saved(msgspec.Struct, frozen=True):
    seq: int
    offsets: dict[int, int]
    state: bytes


class SnapshotStore:
    """Numbered snapshots of one consumer group's window state in ``folder``."""

    def __init__(self, folder: Path, group: str) -> None:
        self.folder = Path(folder)
        self.prefix = f"windows~{group}~"
        self._seq = max((s.seq for s in self._all()), default=0)

    def _all(self) -> list[_Saved]:
        saved = []
        for path in sorted(self.folder.glob(f"{self.prefix}*.snap")):
            try:
                saved.append(msgspec.msgpack.decode(path.read_bytes(), type=_Saved))
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("ignoring unreadable window snapshot %s: %s", path, exc)
        return sorted(saved, key=lambda s: s.seq, reverse=True)

    def save(self, state: bytes, offsets: dict[int, int]) -> None:
        """Durably store ``state`` as the window state after ``offsets`` (partition -> next)."""
        self._seq += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}{self._seq:012d}.snap"
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.msgpack.encode(_Saved(self._seq, offsets, state)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)
        for old in sorted(self.folder.glob(f"{self.prefix}*.snap"))[:-KEEP]:
            old.unlink(missing_ok=True)

    def load(self, committed: dict[int, int]) -> bytes | None:
        """The state saved at exactly the ``committed`` offsets, or None if there is none.

        ``committed`` maps every partition that has a committed offset to it.
        """
        for saved in self._all():
            if saved.offsets == committed:
                return saved.state
        return None
