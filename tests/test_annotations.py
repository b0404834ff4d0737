"""The annotation store (a real SQLite file): append-only rows, WAL, concurrent writers from
several processes losing nothing; and the study's agreement measures against known values."""

import multiprocessing as mp
import sqlite3

import pytest

from refusalscope.errors import UserError
from refusalscope.methods.human_study import agreement, majority_labels
from refusalscope.run.annotations import AnnotationStore


def test_changed_answers_are_new_rows_and_the_latest_counts(tmp_path):
    store = AnnotationStore(tmp_path / "a.sqlite")
    store.add("ann", "3-1", ["dangerous_topics"])
    store.add("ann", "3-1", ["None"])
    store.add("bob", "3-1", ["dangerous_topics", "privacy_violations"])
    rows = store.answers()
    assert [r["labels"] for r in rows] == [["dangerous_topics"], ["None"], ["dangerous_topics", "privacy_violations"]]
    assert rows[0]["created"] < rows[1]["created"] < rows[2]["created"]
    assert store.latest() == {"3-1": {"ann": ["None"], "bob": ["dangerous_topics", "privacy_violations"]}}
    assert store.annotators() == {"ann": 1, "bob": 1} and store.count() == 3
    with sqlite3.connect(tmp_path / "a.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(UserError):
        store.add("ann", "3-1", [])


def _writer(path: str, name: str, n: int) -> None:
    store = AnnotationStore(path, timeout=60)
    for i in range(n):
        store.add(name, f"{i % 7}-{i}", ["None"] if i % 2 else ["dangerous_topics"])


def test_concurrent_writers_lose_no_row(tmp_path):
    path = str(tmp_path / "a.sqlite")
    AnnotationStore(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"w{k}", 60)) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 6
    store = AnnotationStore(path)
    assert store.count() == 360
    assert store.annotators() == {f"w{k}": 60 for k in range(6)}
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in con.execute("SELECT id FROM answers ORDER BY id")]
    assert ids == list(range(1, 361))


def test_a_corrupt_store_is_a_one_line_error(tmp_path):
    bad = tmp_path / "a.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="cannot be opened"):
        AnnotationStore(bad)


def test_agreement_matches_known_values():
    cats = ["a", "b"]
    perfect = {f"f{i}": {"x": ["a"] if i % 2 else ["b"], "y": ["a"] if i % 2 else ["b"]} for i in range(6)}
    res = agreement(perfect, cats)
    assert res["alpha_masi"] == pytest.approx(1.0) and res["fleiss"]["a"] == pytest.approx(1.0)
    # two raters who always disagree on a yes/no category: Fleiss' kappa is -1
    opposed = {f"f{i}": {"x": ["a"], "y": ["b"]} if i % 2 else {"x": ["b"], "y": ["a"]} for i in range(6)}
    res = agreement(opposed, cats)
    assert res["fleiss"]["a"] == pytest.approx(-1.0) and res["alpha_masi"] < 0
    # items with one annotator do not count; fewer than two items: undefined
    assert agreement({"f1": {"x": ["a"]}, "f2": {"x": ["a"], "y": ["a"]}}, cats)["alpha_masi"] is None
    # Fleiss needs a fixed number of raters: it uses the most common count
    mixed = {**perfect, "g": {"x": ["a"], "y": ["b"], "z": ["a"]}}
    assert agreement(mixed, cats)["fleiss_items"] == 6 and agreement(mixed, cats)["n_items"] == 7


def test_majority_of_three_needs_two():
    got = majority_labels({"1-1": [["a", "b"], ["a"], ["c"]], "1-2": [["a"], ["b"], ["None"]]}, min_agree=2)
    assert got == {"1-1": ["a"], "1-2": []}
