"""Readers that turn a prompt file into numbered records (dicts), one per row.

Kept apart from `prompts` so that the schema logic (which column is the prompt) sees one shape,
whatever the file format. Every record carries the line (text formats) or row (binary formats)
it came from, so errors can point at it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from refusalscope.errors import UserError

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet", "txt", "hf")
_ALIASES = {"text": "txt", "ndjson": "jsonl", "datasets": "hf", "arrow": "hf", "pq": "parquet"}
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".pq": "parquet", ".txt": "txt"}
_FORMAT_HINT = "pass --format json|jsonl|csv|tsv|parquet|txt|hf"


@dataclass
class Table:
    """Rows of one source: `records` pairs a 1-based line/row number with the row's fields."""

    name: str                            # file (or folder) name used in messages
    stem: str                            # used for ids: "<stem>-<number>"
    unit: str                            # "line" or "row"
    records: list[tuple[int, dict]]
    columns: list[str]
    split: str | None = None             # DatasetDict split that was read


def read_table(path: str | Path, fmt: str = "auto") -> Table:
    """Read `path` (optionally "folder::split" for a saved DatasetDict) in format `fmt`."""
    path, split = _split_suffix(str(path))
    if not path.exists():
        raise UserError(f"prompt file {path} does not exist: check the path")
    fmt = _ALIASES.get(fmt.lower(), fmt.lower()) if fmt else "auto"
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown prompt format '{fmt}' for {path.name}: {_FORMAT_HINT}")
    if path.is_dir() or fmt == "hf":
        return read_saved_dataset(path, split)
    if split is not None:
        raise UserError(f"{path.name} is a file, '::{split}' only applies to a saved DatasetDict "
                        f"folder: drop '::{split}'")
    if fmt == "parquet" or (fmt == "auto" and _EXTENSIONS.get(path.suffix.lower()) == "parquet"):
        return read_parquet(path)
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"prompt file {path.name} is empty: add prompts or pick another file")
    if fmt == "auto":
        fmt = _EXTENSIONS.get(path.suffix.lower()) or _sniff(text, path)
    return parse_text(text, fmt, path.name, path.stem)


def parse_text(text: str, fmt: str, name: str, stem: str) -> Table:
    """Parse already-read text in a text format (json, jsonl, csv, tsv, txt)."""
    if fmt == "json":
        return _parse_json(text, name, stem)
    if fmt == "jsonl":
        return _parse_jsonl(text, name, stem)
    if fmt in ("csv", "tsv"):
        return _parse_csv(text, name, stem, "\t" if fmt == "tsv" else ",")
    records = [(i, {"text": s.strip()}) for i, s in enumerate(text.splitlines(), 1)
               if s.strip() and not s.strip().startswith("#")]
    return Table(name, stem, "line", records, ["text"])


def _split_suffix(raw: str) -> tuple[Path, str | None]:
    if "::" in raw and not Path(raw).exists():
        base, _, split = raw.rpartition("::")
        return Path(base), split
    return Path(raw), None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path.name} is not UTF-8 text (byte {e.start}): re-save it as UTF-8 "
                        f"or, for a binary table, {_FORMAT_HINT}") from None


def _sniff(text: str, path: Path) -> str:
    head = text.lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        first = text.lstrip().splitlines()[0]
        try:
            json.loads(first)
            return "jsonl"
        except json.JSONDecodeError:
            return "json"
    raise UserError(f"cannot tell the format of {path.name} from its extension "
                    f"'{path.suffix}': {_FORMAT_HINT}")


def _records_from_items(items: list, lines: list[int], name: str, stem: str, unit: str) -> Table:
    records, columns = [], {}
    for num, item in zip(lines, items):
        if isinstance(item, str):
            item = {"text": item}
        elif not isinstance(item, dict):
            raise UserError(f"{name} {unit} {num}: expected a JSON object or string, got "
                            f"{type(item).__name__}: write one object per prompt")
        records.append((num, item))
        columns.update(dict.fromkeys(item))
    return Table(name, stem, unit, records, list(columns))


def _parse_json(text: str, name: str, stem: str) -> Table:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, name, stem)  # JSONL saved as .json
        raise UserError(f"{name} line {e.lineno}: invalid JSON ({e.msg}, column {e.colno}): fix "
                        f"it; a .json file holds one JSON list, a file with one object per line "
                        f"is JSONL (name it .jsonl or pass --format jsonl)") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{name}: expected a JSON list of prompt objects, got an object with "
                            f"keys {', '.join(map(str, data))}: wrap the prompts in one list")
        data = lists[0]
        return _records_from_items(data, list(range(1, len(data) + 1)), name, stem, "item")
    if not isinstance(data, list):
        raise UserError(f"{name}: expected a JSON list of prompt objects, got "
                        f"{type(data).__name__}: wrap the prompts in a list")
    return _records_from_items(data, _item_lines(text), name, stem, "line")


def _item_lines(text: str) -> list[int]:
    """Line on which each top-level list item starts (the text is known to be a valid list)."""
    dec, ws = json.JSONDecoder(), " \t\r\n"
    out: list[int] = []
    idx, line, last = text.index("[") + 1, 1, 0
    while True:
        while text[idx] in ws or text[idx] == ",":
            idx += 1
        if text[idx] == "]":
            return out
        line += text.count("\n", last, idx)
        last = idx
        out.append(line)
        _, idx = dec.raw_decode(text, idx)


def _parse_jsonl(text: str, name: str, stem: str) -> Table:
    items, lines = [], []
    for num, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            items.append(json.loads(raw))
        except json.JSONDecodeError as e:
            hint = (" (this looks like one JSON document: name it .json or pass --format json)"
                    if raw.strip() in ("[", "{") else "")
            raise UserError(f"{name} line {num}: invalid JSON ({e.msg}, column {e.colno}): "
                            f"each line of a JSONL file must be one complete JSON object"
                            f"{hint}") from None
        lines.append(num)
    return _records_from_items(items, lines, name, stem, "line")


def _parse_csv(text: str, name: str, stem: str, delimiter: str) -> Table:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records, start = [], 1
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise UserError(f"{name} line {start}: more fields than the header has "
                                f"({len(columns)}): quote fields that contain '{delimiter}'")
            records.append((start, dict(row)))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{name} line {start}: malformed CSV ({e}): fix the quoting "
                        f"on that line") from None
    return Table(name, stem, "line", records, columns)


def read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path.name} is not a readable Parquet file ({type(e).__name__}): "
                        f"check the file or {_FORMAT_HINT}") from None
    return _rows_table(rows, path.name, path.stem)


def _rows_table(rows: list[dict], name: str, stem: str, split: str | None = None) -> Table:
    columns = list(dict.fromkeys(k for r in rows[:1] for k in r))
    return Table(name, stem, "row", list(enumerate(rows, 1)), columns, split)


def read_saved_dataset(folder: Path, split: str | None) -> Table:
    """Read a `datasets` save_to_disk folder with pyarrow, so `datasets` need not be installed."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        chosen = split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
        if chosen not in splits:
            raise UserError(f"{folder.name} has splits {', '.join(splits)}, not "
                            f"'{split or 'train'}': pick one with {folder}::SPLIT")
        table = read_saved_dataset(folder / chosen, None)
        table.name, table.stem = f"{folder.name}::{chosen}", f"{folder.name}-{chosen}"
        table.split = chosen
        return table
    if split is not None:
        raise UserError(f"{folder.name} is a single saved dataset, not a DatasetDict: "
                        f"drop '::{split}'")
    if not ((folder / "state.json").is_file() or (folder / "dataset_info.json").is_file()):
        raise UserError(f"{folder} is a folder without dataset_info.json/state.json: pass a prompt "
                        f"file or a folder written by datasets' save_to_disk")
    return _rows_table(_arrow_rows(folder), folder.name, folder.name)


def _arrow_rows(folder: Path) -> list[dict]:
    import pyarrow as pa

    files: list[Path] = []
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state.get("_data_files", [])]
    files = files or sorted(folder.glob("*.arrow"))
    if not files:
        raise UserError(f"{folder.name} has no .arrow data files: save it again with "
                        f"save_to_disk")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    tables.append(pa.ipc.open_stream(src).read_all())
                except pa.ArrowInvalid:
                    src.seek(0)
                    tables.append(pa.ipc.open_file(src).read_all())
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"{folder.name}/{f.name} is not a readable Arrow file ({e}): save the "
                            f"dataset again with save_to_disk") from None
    return pa.concat_tables(tables).to_pylist()


# ---------------------------------------------------------------- hub datasets
HUB_PREFIX = "hf:"


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """"hf:<dataset id or local folder>[:config][::split]" -> (id, config, split). The split may
    slice ("train[:80%]", "train[400:]"), as `datasets.load_dataset` reads it; default "train"."""
    if not spec.startswith(HUB_PREFIX):
        raise UserError(f"{spec!r} is not a hub dataset spec: write hf:<dataset id>[:config][::split]")
    body, _, split = spec[len(HUB_PREFIX):].partition("::")
    repo, _, config = body.partition(":")
    if not repo.strip():
        raise UserError(f"{spec!r} names no dataset: write hf:<dataset id>[:config][::split], "
                        "e.g. hf:walledai/AdvBench")
    return repo.strip(), (config.strip() or None), (split.strip() or "train")


def read_hub_dataset(spec: str) -> Table:
    """Rows of a dataset read through `datasets.load_dataset` (hub id, or a local folder of data
    files). HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured: offline it reads the datasets
    cache, and a dataset that is not there is a one-line error saying what to download."""
    repo, config, split = parse_hub_spec(spec)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with sae-lens
        raise UserError(f"{spec}: reading hub datasets needs the `datasets` package: pip install "
                        "datasets, or pass a local file") from None
    where = repr(repo) + (f", {config!r}" if config else "")
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline, unknown id, gated, bad split: datasets raises many types
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"cannot read hub dataset {spec} ({type(err).__name__}: {detail}): where the hub "
                        f"is reachable run datasets.load_dataset({where}, split={split!r}).save_to_disk(FOLDER) "
                        f"and pass FOLDER in place of {spec}") from None
    stem = repo.rstrip("/").split("/")[-1] + (f"-{config}" if config else "")
    return _rows_table(ds.to_list(), spec, stem, split)
