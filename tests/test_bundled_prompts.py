"""Checks on the bundled prompt sets and texts: they feed the demo fine-tune, the refusal
direction and the CoCoNot mapping, so their size, labels, splits and variety are contracts."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

RES = Path(__file__).resolve().parents[1] / "src" / "refusalscope" / "resources"
PROMPTS = RES / "prompts"
TEXTS = RES / "texts"

UNSAFE = {
    "offensive_language",
    "dangerous_topics",
    "false_information",
    "privacy_violations",
    "copyright_violations",
}
SPLITS = {"train", "val", "test"}
PROMPT_FILES = ["harmful.jsonl", "harmless.jsonl", "ood.jsonl"]
ALL_FILES = [PROMPTS / f for f in PROMPT_FILES + ["refusals.jsonl"]] + [
    TEXTS / "general.jsonl",
    TEXTS / "openings.jsonl",
]


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{n} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}:{n} is not an object"
        rows.append(row)
    return rows


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def first_two(text: str) -> str:
    return " ".join(words(text)[:2])


@pytest.fixture(scope="module")
def harmful():
    return load(PROMPTS / "harmful.jsonl")


@pytest.fixture(scope="module")
def harmless():
    return load(PROMPTS / "harmless.jsonl")


@pytest.fixture(scope="module")
def ood():
    return load(PROMPTS / "ood.jsonl")


@pytest.fixture(scope="module")
def refusals():
    return load(PROMPTS / "refusals.jsonl")


@pytest.fixture(scope="module")
def general():
    return load(TEXTS / "general.jsonl")


@pytest.fixture(scope="module")
def openings():
    return load(TEXTS / "openings.jsonl")


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_line_parses_and_has_an_id(path):
    rows = load(path)
    assert rows
    for row in rows:
        assert isinstance(row.get("id"), str) and row["id"]


def test_ids_unique_across_all_files():
    ids = [row["id"] for path in ALL_FILES for row in load(path)]
    dup = [k for k, v in Counter(ids).items() if v > 1]
    assert not dup, f"duplicate ids: {dup[:10]}"


def test_instructions_unique_across_prompt_files(harmful, harmless, ood):
    texts = [norm(r["instruction"]) for r in harmful + harmless + ood]
    dup = [k for k, v in Counter(texts).items() if v > 1]
    assert not dup, f"duplicate instructions: {dup[:5]}"


@pytest.mark.parametrize("path", ALL_FILES[3:], ids=lambda p: p.name)
def test_texts_unique(path):
    texts = [norm(r["text"]) for r in load(path)]
    assert len(texts) == len(set(texts))


def _check_prompt_fields(rows, extra=()):
    for r in rows:
        for key in ("id", "instruction", "category", "subcategory", "split", "style", *extra):
            assert key in r, f"{r.get('id')} lacks {key}"
        for key in ("instruction", "subcategory", "style"):
            assert isinstance(r[key], str) and r[key].strip(), f"{r['id']}: empty {key}"
        assert r["split"] in SPLITS, r["id"]


def test_harmful_counts_and_categories(harmful):
    _check_prompt_fields(harmful)
    assert len(harmful) >= 660
    cats = Counter(r["category"] for r in harmful)
    assert set(cats) == UNSAFE, cats
    assert all(n >= 100 for n in cats.values()), cats
    assert cats.most_common(1)[0][0] == "dangerous_topics"
    for r in harmful:
        assert 3 <= len(r["instruction"].split()) <= 40, r["id"]


def test_harmless_counts_and_contrast(harmless):
    _check_prompt_fields(harmless, extra=("contrast",))
    assert len(harmless) >= 1040
    assert {r["category"] for r in harmless} == {"harmless"}
    assert all(isinstance(r["contrast"], bool) for r in harmless)
    assert sum(r["contrast"] for r in harmless) >= 700
    assert sum(not r["contrast"] for r in harmless) >= 300
    for r in harmless:
        assert 3 <= len(r["instruction"].split()) <= 40, r["id"]


def _num(row: dict) -> int:
    return int(row["id"].rsplit("-", 1)[1])


def test_harmful_splits_stratified_by_category(harmful):
    # harm-0001..0420 were split 50/15/35 within each category; the 260 added later all went
    # to train, so each category is now train-heavy with a thinner val and test share.
    for cat in UNSAFE:
        rows = [r for r in harmful if r["category"] == cat]
        splits = Counter(r["split"] for r in rows)
        assert set(splits) == SPLITS, (cat, splits)
        assert splits["train"] / len(rows) >= 0.50, (cat, splits)
        assert splits["val"] / len(rows) >= 0.07, (cat, splits)
        assert splits["val"] >= 9, (cat, splits)
        assert splits["test"] / len(rows) >= 0.15, (cat, splits)
        first = [r for r in rows if _num(r) <= 420]
        splits = Counter(r["split"] for r in first)
        assert abs(splits["train"] / len(first) - 0.50) < 0.06, (cat, splits)
        assert abs(splits["val"] / len(first) - 0.15) < 0.05, (cat, splits)
        assert abs(splits["test"] / len(first) - 0.35) < 0.06, (cat, splits)


def test_harmless_splits_stratified_by_contrast(harmless):
    # The first 439 rows were split 50/15/35; the 320 added next went 80/20 to train/test and
    # the 300 + 88 contrast rows after them all went to train, so each group is train-heavy and
    # contrast val is thin (30 of 807 rows): its share only shrinks as training rows are added,
    # the counts (30 val for layer
    # selection, 100+ test for the quality table) are what matter.
    for flag in (True, False):
        rows = [r for r in harmless if r["contrast"] is flag]
        splits = Counter(r["split"] for r in rows)
        assert set(splits) == SPLITS, (flag, splits)
        assert splits["train"] / len(rows) >= 0.50, (flag, splits)
        assert splits["val"] / len(rows) >= 0.035, (flag, splits)
        assert splits["val"] >= 30, (flag, splits)
        assert splits["test"] / len(rows) >= 0.13 and splits["test"] >= 100, (flag, splits)


def test_ood_composition(ood):
    _check_prompt_fields(ood, extra=("label", "contrast"))
    assert {r["split"] for r in ood} == {"test"}
    bad = [r["id"] for r in ood if r["label"] not in {"harmful", "harmless"}]
    assert not bad
    bad = [r["id"] for r in ood if (r["label"] == "harmful") != (r["category"] in UNSAFE)]
    assert not bad, f"label and category disagree: {bad}"
    bad = [r["id"] for r in ood if r["label"] == "harmless" and r["category"] != "harmless"]
    assert not bad
    harm = [r for r in ood if r["label"] == "harmful"]
    safe = [r for r in ood if r["label"] == "harmless"]
    assert len(harm) == 60 and len(safe) == 60
    cats = Counter(r["category"] for r in harm)
    assert set(cats) == UNSAFE and min(cats.values()) >= 10, cats
    assert sum(bool(r["contrast"]) for r in safe) == 30
    assert not any(r["contrast"] for r in harm)


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_first_two_words_rarely_shared(name):
    rows = load(PROMPTS / name)
    counts = Counter(first_two(r["instruction"]) for r in rows)
    top, n = counts.most_common(1)[0]
    assert n <= 0.04 * len(rows), f"{name}: {n} prompts start with {top!r}"


def test_refusals(refusals):
    assert len(refusals) >= 120
    for r in refusals:
        text = r["text"]
        assert re.match(r"I\b", text), f"{r['id']} does not start with 'I'"
        assert 8 <= len(text.split()) <= 45, r["id"]
    # No phrase (word n-gram, n >= 2) may appear in more than 15% of refusals.
    limit = 0.15 * len(refusals)
    for n in (2, 3, 4):
        seen = Counter()
        for r in refusals:
            w = words(r["text"])
            seen.update({" ".join(w[i : i + n]) for i in range(len(w) - n + 1)})
        phrase, count = seen.most_common(1)[0]
        assert count <= limit, f"{phrase!r} appears in {count} refusals"


def test_general_texts(general):
    assert len(general) >= 120
    for r in general:
        assert isinstance(r.get("domain"), str) and r["domain"], r["id"]
        assert 60 <= len(r["text"].split()) <= 150, r["id"]
    assert len({r["domain"] for r in general}) >= 10


def test_openings(openings):
    assert len(openings) >= 200
    for r in openings:
        assert 3 <= len(r["text"].split()) <= 15, r["id"]


def test_capped_prompt_sets_are_seeded_draws_across_categories():
    """Bundled files are grouped by category: a cap must not keep the first category only."""
    from refusalscope.io.prompts import load_bundled
    from refusalscope.run.resolve import take

    prompts = load_bundled("harmful", split="test")
    got = take(prompts, 40, seed=0)
    assert len(got) == 40 and len({p.category for p in got}) == 5
    assert take(prompts, 40, 0) == got and take(prompts, 40, 1) != got
    assert take(prompts, None, 0) == prompts and take(prompts, 10_000, 0) == prompts
