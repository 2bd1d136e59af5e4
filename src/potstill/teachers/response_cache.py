"""The response cache of `EndpointTeacher`: one SQLite file in WAL mode, one row per request.

The row key is `request_key(kind, body)` = sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of
`{"kind": "chat" | "completion", **body}`, where the body holds the model name and every sampling parameter
that is sent (parameters left at None are not sent and not keyed). The base URL is not part of the key: the
same model name at two addresses shares rows. A request whose key is cached never touches the network; a
successful response is committed before it is returned, so a killed run loses only its in-flight requests
and a re-run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from potstill.errors import UserError

_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"""


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes used for keys and hashes: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request_key(kind: str, body: dict) -> str:
    """sha256 (hex) of the canonical JSON of `{"kind": kind, **body}`; kind is "chat" or "completion"."""
    if kind not in ("chat", "completion"):
        raise ValueError(f'kind must be "chat" or "completion", got {kind!r}')
    return hashlib.sha256(canonical_json({"kind": kind, **body})).hexdigest()


class ResponseCache:
    """Responses by request key, in one SQLite file (WAL journal, so readers never block the writer).

    Each `put` is its own committed transaction; with `synchronous=NORMAL` a committed row survives the process
    being killed (not necessarily a power loss). Several processes may share the file: writers wait up to
    `busy_timeout_s` for the lock, and when two of them store the same key the first row is kept. One
    connection serves all threads, behind a lock. The request stored is the JSON body only, never a header.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"response cache {self.path}: is a folder; expected a SQLite file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UserError(f"response cache {self.path}: not a usable SQLite file ({err})") from err

    def get(self, key: str) -> dict | None:
        """The stored response JSON for `key`, or None."""
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, request: dict, response: dict) -> None:
        """Store one response (committed before returning); an existing row for `key` is kept."""
        request_text = canonical_json(request).decode("utf-8")
        response_text = json.dumps(response, ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO responses (key, request, response, created) VALUES (?, ?, ?, ?)",
                             (key, request_text, response_text, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def keys(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT key FROM responses")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
