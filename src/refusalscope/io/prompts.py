"""Prompt sets: load user files in the formats the paper's setup uses, and the bundled sets.

The paper works with harmful prompts (refusal_direction splits, AdvBench, HarmBench, CoCoNot's
unsafe subset) and harmless ones (Alpaca). Users point at their own copies (files or saved
`datasets` folders), at hub datasets ("hf:walledai/AdvBench", read through `datasets` and its
cache, so they work offline once cached), and the project ships its own small sets under
`refusalscope/resources`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from refusalscope.errors import UserError
from refusalscope.io.prompt_formats import HUB_PREFIX, Table, parse_text, read_hub_dataset, read_table

# Columns tried, in order, when no text field is given (case ignored): refusal_direction and
# Alpaca `instruction`; CoCoNot, OR-Bench and XSTest `prompt`; AdvBench and JailbreakBench `Goal`
# (before JailbreakBench's short `Behavior` name); HarmBench `Behavior`; StrongREJECT
# `forbidden_prompt`; Do-Not-Answer `question`.
TEXT_FIELDS = ("instruction", "prompt", "goal", "Behavior", "forbidden_prompt", "text", "question")
_CATEGORY_FIELDS = ("category", "SemanticCategory")
_SUBCATEGORY_FIELDS = ("subcategory", "sub_category")
_ID_FIELDS = ("id", "BehaviorID")
_LABEL_FIELDS = ("label", "prompt_harm_label")
LABELS = ("harmful", "harmless")
# Label spellings of sets that mix safe and unsafe prompts (XSTest: safe/unsafe, WildGuardMix:
# harmful/unharmful), mapped to ours.
LABEL_SYNONYMS = {"harmful": "harmful", "unsafe": "harmful", "harmless": "harmless", "safe": "harmless",
                  "unharmful": "harmless", "benign": "harmless"}

# Bundled name -> (folder under resources, file, text field, label given to every prompt).
# The demo world's build hash digests the .jsonl files of prompts/ and texts/ (demo/recipe.py):
# sets the build does not read (the over-refusal CSV) use another extension, so adding or
# editing them never forces a rebuild.
_BUNDLED = {
    "harmful": ("prompts", "harmful.jsonl", "instruction", "harmful"),
    "harmless": ("prompts", "harmless.jsonl", "instruction", "harmless"),
    "ood": ("prompts", "ood.jsonl", "instruction", None),
    "refusals": ("prompts", "refusals.jsonl", "text", None),
    "general": ("texts", "general.jsonl", "text", None),
    "openings": ("texts", "openings.jsonl", "text", None),
    "overrefusal": ("prompts", "overrefusal.csv", "prompt", None),
}


@dataclass(frozen=True)
class Prompt:
    """One instruction to show the model, with where it came from."""

    text: str
    id: str = ""
    category: str | None = None
    subcategory: str | None = None
    source: str = ""
    split: str | None = None
    label: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    line: int | None = field(default=None, compare=False)  # line (or row) in its file, for messages


def load_prompts(path: str | Path, fmt: str = "auto", *, text_field: str | None = None,
                 limit: int | None = None, label: str | None = None) -> list[Prompt]:
    """Load prompts from a file, a saved `datasets` folder ("folder::split" picks a split) or a
    hub dataset ("hf:<id>[:config][::split]").

    `label` is given to rows that carry no "harmful"/"harmless" label of their own.
    `limit` keeps the first `limit` prompts (rows after them are not checked).
    """
    _check_label(label)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of prompts, got {limit}: pass 1 or more")
    table = read_hub_dataset(str(path)) if str(path).startswith(HUB_PREFIX) else read_table(path, fmt)
    return _to_prompts(table, text_field, limit, label)


def bundled_names() -> list[str]:
    """Names accepted by `load_bundled` whose files are installed."""
    return [n for n, (folder, fname, *_) in _BUNDLED.items()
            if (_resources_root() / folder / fname).is_file()]


def bundled_file(name: str):
    """The file (a Traversable) of a bundled set, e.g. to digest it."""
    if name not in _BUNDLED:
        raise UserError(f"unknown bundled prompt set '{name}': use one of {', '.join(_BUNDLED)}")
    folder, fname, *_ = _BUNDLED[name]
    return _resources_root() / folder / fname


def load_bundled(name: str, split: str | None = None, *, contrast: bool | None = None,
                 label: str | None = None) -> list[Prompt]:
    """Load a set shipped with refusalscope, filtered by split, contrast flag and label."""
    if name not in _BUNDLED:
        raise UserError(f"unknown bundled prompt set '{name}': use one of {', '.join(_BUNDLED)}")
    _check_label(label)
    folder, fname, text_field, set_label = _BUNDLED[name]
    res = _resources_root() / folder / fname
    if not res.is_file():
        raise UserError(f"bundled prompt set '{name}' ({folder}/{fname}) is missing from this "
                        f"install: reinstall refusalscope")
    fmt = "csv" if fname.endswith(".csv") else "jsonl"
    table = parse_text(res.read_text(encoding="utf-8"), fmt, f"bundled:{name}", name)
    prompts = _to_prompts(table, text_field, None, set_label)
    if set_label is not None:  # the set defines the label, whatever a row says
        prompts = [_with_label(p, set_label) for p in prompts]
    if split is not None:
        have = sorted({p.split for p in prompts if p.split is not None})
        if split not in have:
            raise UserError(f"bundled set '{name}' has no split '{split}' (splits: "
                            f"{', '.join(have) or 'none'}): pick one of those or drop split")
        prompts = [p for p in prompts if p.split == split]
    if contrast is not None:
        if not any("contrast" in p.meta for p in prompts):
            raise UserError(f"bundled set '{name}' has no contrast flag: use contrast only "
                            f"with 'harmless'")
        prompts = [p for p in prompts if bool(p.meta.get("contrast")) == contrast]
    if label is not None:
        prompts = [p for p in prompts if p.label == label]
    if not prompts:
        raise UserError(f"bundled set '{name}' has no prompts with split={split}, "
                        f"contrast={contrast}, label={label}: loosen the filters")
    return prompts


_T = TypeVar("_T")


def sample(prompts: Sequence[_T], n: int, seed: int) -> list[_T]:
    """`n` prompts drawn without replacement; the same seed gives the same draw, and a smaller
    `n` gives a prefix of a larger one."""
    if not 0 <= n <= len(prompts):
        raise UserError(f"cannot sample {n} prompts from {len(prompts)}: ask for at most "
                        f"{len(prompts)} or load more prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:n]]


def split_prompts(prompts: Sequence[Prompt], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """Shuffle once with `seed` and cut into train/val/test (disjoint, covering all prompts).
    Each part keeps the input order."""
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, "
                        f"got {tuple(fractions)}: e.g. (0.8, 0.1, 0.1)")
    n = len(prompts)
    order = np.random.default_rng(seed).permutation(n)
    cut1 = round(fr[0] * n)
    cut2 = max(cut1, min(n, round((fr[0] + fr[1]) * n)))
    parts = (order[:cut1], order[cut1:cut2], order[cut2:])
    return tuple([prompts[i] for i in sorted(part)] for part in parts)  # type: ignore[return-value]


def filter_refused(prompts: Sequence[Prompt], verdicts: Sequence[bool]
                   ) -> tuple[list[Prompt], dict[str, int]]:
    """Keep the prompts the model refused (verdict True): the paper studies only refused
    harmful prompts, since a latent cannot be causal for a refusal that never happens."""
    verdicts = list(verdicts)
    if len(verdicts) != len(prompts):
        raise UserError(f"got {len(verdicts)} refusal verdicts for {len(prompts)} prompts: "
                        f"judge every prompt once")
    kept = [p for p, v in zip(prompts, verdicts) if bool(v)]
    return kept, {"n_in": len(prompts), "n_kept": len(kept), "n_dropped": len(prompts) - len(kept)}


def heldout_split(prompts: Sequence[Prompt], fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(search, held-out): within each category, a seeded draw of round(fraction · n) prompts is
    held out, so both parts keep the category mix. Each part keeps the input order."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"held-out fraction {fraction} is outside [0, 1): pick e.g. 0.5, or 0 for none")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.category or "", []).append(i)
    held: set[int] = set()
    for g, (_, idx) in enumerate(sorted(groups.items())):
        k = round(fraction * len(idx))
        order = np.random.default_rng([seed, g]).permutation(len(idx))
        held.update(idx[j] for j in order[:k])
    return ([p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held])


def _resources_root():
    """Root of the bundled data (a Traversable); tests point it elsewhere."""
    return resources.files("refusalscope") / "resources"


def _check_label(label: str | None) -> None:
    if label is not None and label not in LABELS:
        raise UserError(f"label must be 'harmful' or 'harmless', got '{label}': fix the label")


def _with_label(p: Prompt, label: str) -> Prompt:
    if p.label == label:
        return p
    return Prompt(p.text, p.id, p.category, p.subcategory, p.source, p.split, label, p.meta, p.line)


def _find(columns: Sequence[str], names: Sequence[str]) -> str | None:
    """First of `names` among `columns`, in the order of `names`; for each name an exact match
    wins over one that differs in case (so JailbreakBench's `Goal` beats its `Behavior`)."""
    lower = {c.lower(): c for c in columns}
    for name in names:
        if name in columns:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _to_prompts(table: Table, text_field: str | None, limit: int | None,
                label: str | None) -> list[Prompt]:
    name, cols = table.name, table.columns
    if not table.records:
        raise UserError(f"no prompts in {name}: add prompts or pick another file")
    listed = ", ".join(map(str, cols)) or "none"
    if text_field is not None:
        tf = _find(cols, [text_field])
        if tf is None:
            raise UserError(f"field '{text_field}' is not in {name} (columns: {listed}): pass one "
                            f"of these as --text-field")
    else:
        tf = _find(cols, TEXT_FIELDS)
        if tf is None:
            raise UserError(f"no prompt column in {name} (columns: {listed}): pass --text-field")
    alpaca_input = "input" if tf.lower() == "instruction" and "input" in cols else None
    cat_f = _find(cols, _CATEGORY_FIELDS)
    sub_f = _find(cols, _SUBCATEGORY_FIELDS)
    id_f, split_f, label_f = _find(cols, _ID_FIELDS), _find(cols, ["split"]), _find(cols, _LABEL_FIELDS)
    used = {tf, alpaca_input, cat_f, sub_f, id_f, split_f}

    out: list[Prompt] = []
    for num, row in table.records:
        if limit is not None and len(out) >= limit:
            break
        text = _text(row, tf, name, table.unit, num)
        extra = row.get(alpaca_input) if alpaca_input else None
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra.strip()}"
        row_label = _row_label(row.get(label_f) if label_f else None, label_f, name, table.unit, num)
        meta = {k: v for k, v in row.items()
                if k not in used and not (k == label_f and row_label in LABELS)}
        out.append(Prompt(
            text=text,
            id=_opt(row.get(id_f) if id_f else None) or f"{table.stem}-{num}",
            category=_opt(row.get(cat_f) if cat_f else None),
            subcategory=_opt(row.get(sub_f) if sub_f else None),
            source=name,
            split=_opt(row.get(split_f) if split_f else None) or table.split,
            label=row_label if row_label in LABELS else label,
            meta=meta,
            line=num,
        ))
    return out


def _row_label(value: Any, field: str | None, name: str, unit: str, num: int) -> str | None:
    """A row's label from its label column: one of the documented spellings, or empty (unlabelled);
    anything else is a mistake in the file ('maybe' was once taken as no label at all)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() in LABEL_SYNONYMS:
        return LABEL_SYNONYMS[value.strip().lower()]
    shown = repr(value)[:40]
    raise UserError(f"{name} {unit} {num}: label {shown} in column '{field}' is not one of "
                    f"{', '.join(LABEL_SYNONYMS)}: fix the label or leave it empty")


def _text(row: dict, tf: str, name: str, unit: str, num: int) -> str:
    if tf not in row or row[tf] is None:
        raise UserError(f"{name} {unit} {num}: field '{tf}' is missing: remove the row or fill it")
    value: Any = row[tf]
    if not isinstance(value, str):
        raise UserError(f"{name} {unit} {num}: field '{tf}' is {type(value).__name__}, not text: "
                        f"make it a string")
    if not value.strip():
        raise UserError(f"{name} {unit} {num}: field '{tf}' is empty: remove the row or fill it")
    return value.strip()


def _opt(value: Any) -> str | None:
    """Optional string field: None, NaN and blanks become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip()
    return s or None
