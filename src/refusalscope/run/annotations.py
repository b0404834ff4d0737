"""The human study's answers: an append-only SQLite file in the run directory.

One row per answer with its time; a changed answer is a new row (the latest counts), never an
overwrite, so every decision an annotator made stays on record. WAL mode and a busy timeout
let several annotators (server threads or processes) write at once without losing a row; each
call opens its own connection, so the store is safe to share across threads."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..artifacts import check_writable
from ..errors import UserError

FILE = "annotations.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator TEXT NOT NULL,
    feature TEXT NOT NULL,
    labels TEXT NOT NULL,          -- JSON list of categories, or ["None"]
    created TEXT NOT NULL          -- UTC, ISO 8601 with microseconds
);
CREATE INDEX IF NOT EXISTS answers_by_annotator ON answers (annotator, feature, id);
"""


class AnnotationStore:
    """Answers of the annotation study, in `RUN_DIR/annotations.sqlite` (or any path)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        check_writable(self.path, "--annotations")
        try:
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UserError(f"annotation store {self.path} cannot be opened ({err}): move the file away "
                            "to start a new one") from None

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike) -> AnnotationStore:
        return cls(Path(run_dir) / FILE)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous=NORMAL")
            yield con
        finally:
            con.close()

    def add(self, annotator: str, feature: str, labels: Sequence[str]) -> int:
        """Record one answer; returns its row id."""
        if not annotator or not feature or not labels:
            raise UserError("an answer needs an annotator, a feature and at least one label")
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute("INSERT INTO answers (annotator, feature, labels, created) VALUES (?, ?, ?, ?)",
                                  (annotator, feature, json.dumps(list(labels)), now))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)

    def answers(self, annotator: str | None = None) -> list[dict]:
        """Every answer in the order given: {id, annotator, feature, labels, created}."""
        sql = "SELECT id, annotator, feature, labels, created FROM answers"
        args: tuple[str, ...] = ()
        if annotator is not None:
            sql, args = sql + " WHERE annotator = ?", (annotator,)
        with self._connect() as con:
            rows = con.execute(sql + " ORDER BY id", args).fetchall()
        return [
            {"id": i, "annotator": a, "feature": f, "labels": json.loads(l), "created": c} for i, a, f, l, c in rows
        ]

    def latest(self, annotator: str | None = None) -> dict[str, dict[str, list[str]]]:
        """{feature: {annotator: labels of their latest answer}}."""
        out: dict[str, dict[str, list[str]]] = {}
        for r in self.answers(annotator):
            out.setdefault(r["feature"], {})[r["annotator"]] = r["labels"]
        return out

    def annotators(self) -> dict[str, int]:
        """{annotator: distinct features answered}."""
        with self._connect() as con:
            rows = con.execute("SELECT annotator, COUNT(DISTINCT feature) FROM answers GROUP BY annotator "
                               "ORDER BY annotator").fetchall()
        return {a: int(n) for a, n in rows}

    def count(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
