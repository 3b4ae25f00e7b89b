"""The node's service table on disk, one row per service, for the next
agent to adopt (cubes/lbrp.ServiceTable).

The runtime's state file is one JSON document written whole on every save:
with the service table in it, an EndpointSlice change at 10 000 Services
cost ~0.2 s of snapshot and ~0.5 s of JSON encoding (7 MB) after the maps
were written, holding the agent's lock and the GIL, so the next change
waited for it. Here a change writes its own row: an SQLite database
(stdlib sqlite3) next to the state file, written in the caller's batch and
committed by commit() when the node saves, in write-ahead-log mode with
synchronous=NORMAL (a commit does not wait for the disk; an agent that
crashes loses nothing committed, as with the state file, which is not
synced either: https://www.sqlite.org/pragma.html#pragma_synchronous).

Thread-safe: the agent's reconcile and local API threads share it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ServiceRowKey = tuple[str, int, str, bool]  # (vip, port, protocol, external)

SCHEMA = ("CREATE TABLE IF NOT EXISTS services (vip TEXT NOT NULL, port INTEGER NOT NULL, "
          "proto TEXT NOT NULL, external INTEGER NOT NULL, row TEXT NOT NULL, "
          "PRIMARY KEY (vip, port, proto, external))")


class ServiceStore:
    """Rows of JSON objects (ServiceTable's per-service state, see
    ServiceTable.row) by (vip, port, protocol, external). Writes are kept
    in an open transaction until commit(). Raises sqlite3.Error when the
    file cannot be opened or written (a full disk, say)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level None: transactions are begun here (BEGIN on the
        # first write after a commit), not by the module behind our back
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(SCHEMA)
        self._conn: sqlite3.Connection | None = db
        self._open = False  # a transaction holds uncommitted writes

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError(f"service store {self.path} is closed")
        return self._conn

    def _begin(self) -> None:
        if not self._open:
            self._db.execute("BEGIN")
            self._open = True

    def rows(self) -> list[dict[str, Any]]:
        """Every row, committed or not."""
        with self._lock:
            return [json.loads(r) for (r,) in self._db.execute("SELECT row FROM services")]

    def put(self, key: ServiceRowKey, row: Mapping[str, Any]) -> None:
        vip, port, proto, external = key
        with self._lock:
            self._begin()
            self._db.execute("INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?)",
                             (vip, port, proto, int(external), json.dumps(row)))

    def delete(self, key: ServiceRowKey) -> None:
        vip, port, proto, external = key
        with self._lock:
            self._begin()
            self._db.execute("DELETE FROM services WHERE vip = ? AND port = ? AND proto = ? "
                             "AND external = ?", (vip, port, proto, int(external)))

    def replace(self, rows: Iterable[tuple[ServiceRowKey, Mapping[str, Any]]]) -> None:
        """Make the store hold exactly `rows` (uncommitted until commit())."""
        with self._lock:
            self._begin()
            self._db.execute("DELETE FROM services")
            self._db.executemany("INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?)",
                                 ((v, p, pr, int(e), json.dumps(row))
                                  for (v, p, pr, e), row in rows))

    def commit(self) -> None:
        """Make the writes since the last commit durable (see the module text)."""
        with self._lock:
            if self._open:
                self._db.execute("COMMIT")
                self._open = False

    def close(self) -> None:
        """Commit and close (idempotent)."""
        with self._lock:
            if self._conn is None:
                return
            if self._open:
                self._conn.execute("COMMIT")
                self._open = False
            self._conn.close()
            self._conn = None

    def remove(self) -> None:
        """Close and delete the database and its log files."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
