"""Window state that survives a restart: a snapshot saved with every offset commit.

A snapshot is written (atomically) before the lake transaction of its flush, tagged with the
offsets after that flush and numbered; the transaction stores the number. A crash before the
commit leaves snapshots ahead of the lake, so the snapshots from the last committed number on
are kept, and the one the lake names is restored: the window state then holds exactly the
events of the stored positions, and the replay adds the rest once.

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

log = logging.getLogger("agentstream.state")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def save(self, state: bytes, offsets: dict[int, int], lineage: str) -> int:
        """Durably store ``state`` as ``lineage``'s state after ``offsets`` (partition -> next);
        returns its number."""
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
        stale = time.time() - STALE_AFTER_S
        for other in self._paths():
            try:
                if other.stat().st_mtime < stale:
                    other.unlink(missing_ok=True)
            except OSError:
                continue
        return seq

    def committed(self, lineage: str, seq: int) -> None:
        """``lineage``'s snapshot ``seq`` is the lake's now: drop its older ones."""
        for old in self._paths(lineage):
            if int(old.name.rsplit("~", 1)[1].split(".")[0]) < seq:
                old.unlink(missing_ok=True)

    def load(self, committed: dict[int, int], landed: dict[str, int]) -> bytes | None:
        """The state saved at exactly the ``committed`` offsets, or None if there is none.

        ``committed`` maps every partition that has a stored position to it; ``landed`` is the
        number each lineage's last lake commit stored: a lineage's other snapshots are of
        flushes that never landed (or were superseded). The newest match of any lineage wins.
        """
        found: list[tuple[float, bytes]] = []
        for path in self._paths():
            saved = self._read(path)
            lineage = path.name[len(self.prefix) :].rsplit("~", 1)[0]
            if lineage in landed and saved is not None and saved.seq != landed[lineage]:
                continue
            if saved is not None and saved.offsets == committed:
                found.append((path.stat().st_mtime, saved.state))
        return max(found, key=lambda f: f[0])[1] if found else None
