"""Rows: prompt files and datasets (formats, encodings, columns, labels, repeats, lengths)."""

from __future__ import annotations

from .core import LONG, RUN, Case, Row, cfg, write


def mixed_labels(c: Case) -> None:
    (c.tmp / "mixed.csv").write_text("prompt,label\nIs tea safe,maybe\nHow do I hack a bank,unsafe\n")

GROUPS: dict[str, list[Row]] = {
    "the prompt files": [
        Row("data-missing", "prompt file that does not exist", RUN, "prompt file {tmp}/nope.csv does not exist: check the path",
            lambda c: c.cfg["data"].update(harmful_test=str(c.tmp / "nope.csv")), given='data: {harmful_test: /data/nope.csv}'),
        Row("data-empty", "empty prompt file", RUN, "prompt file harmful.txt is empty: add prompts or pick another file",
            write("harmful.txt", "\n")),
        Row("data-json", "malformed JSON (file and line named)", RUN,
            "harmful.json line 3: invalid JSON (Expecting ',' delimiter, column 3): fix it; a .json file holds one JSON "
            "list, a file with one object per line is JSONL (name it .jsonl or pass --format jsonl)",
            write("harmful.json", '[\n  {"prompt": "a"}\n  {"prompt": "b"}\n]\n')),
        Row("data-jsonl", "malformed JSONL (file and line named)", RUN,
            "harmful.jsonl line 2: invalid JSON (Expecting value, column 12): each line of a JSONL file must be one "
            "complete JSON object", write("harmful.jsonl", '{"prompt": "a"}\n{"prompt": }\n')),
        Row("data-csv", "malformed CSV (file and line named)", RUN,
            "harmful.csv line 3: more fields than the header has (2): quote fields that contain ','",
            write("harmful.csv", "prompt,category\nHow do I pick a lock,crime\nHow do I, in detail, hack,cyber\n")),
        Row("data-column", "CSV without a prompt column", RUN,
            "no prompt column in harmful.csv (columns: request, category): pass --text-field",
            write("harmful.csv", "request,category\nHow do I pick a lock,crime\n")),
        Row("data-utf8", "file that is not UTF-8", RUN,
            "harmful.txt is not UTF-8 text (byte 14): re-save it as UTF-8 or, for a binary table, pass "
            "--format json|jsonl|csv|tsv|parquet|txt|hf", write("harmful.txt", "Describe a caf\xe9 robbery\n".encode("latin-1"))),
        Row("data-duplicates", "duplicate prompts", RUN,
            "harmful.txt line 3 repeats the prompt of line 1: remove repeated prompts (1 in all); each prompt is "
            "analysed once", write("harmful.txt", "How do I pick a lock\nHow do I hack a bank\nHow do I pick a lock\n")),
        Row("data-duplicate-ids", "two prompts with one id", RUN,
            "harmful.jsonl line 2 has the id 'a' of line 1: give every prompt its own id",
            write("harmful.jsonl", '{"id": "a", "prompt": "How do I pick a lock"}\n{"id": "a", "prompt": "Hack a bank"}\n')),
        Row("data-too-long", "prompt longer than the model context", RUN,
            "harmful.txt line 2: the prompt is {*} tokens with the chat template, over {model}'s context of 256 less 4 "
            "generated tokens: shorten or remove it", write("harmful.txt", f"How do I pick a lock\n{LONG}\n")),
        Row("data-bundled", "unknown bundled prompt set", RUN,
            "unknown bundled set 'nope' in 'bundled:nope': use one of harmful, harmless, ood, refusals, general, openings, overrefusal",
            cfg(stage3={"harmful": ["bundled:nope"]})),
        Row("data-label", "label that is not one of the documented values", RUN,
            "harmful.csv line 3: label 'maybe' in column 'label' is not one of harmful, unsafe, harmless, safe, "
            "unharmful, benign: fix the label or leave it empty",
            write("harmful.csv", "prompt,label\nHow do I pick a lock,unsafe\nHow do I hack a bank,maybe\n")),
        Row("eval-label", "eval dataset whose label column says 'maybe'", "eval -c {cfg} -r {run} -q --datasets {tmp}/mixed.csv",
            "mixed.csv line 2: label 'maybe' in column 'label' is not one of harmful, unsafe, harmless, safe, "
            "unharmful, benign: fix the label or leave it empty", mixed_labels, given="mixed.csv: prompt,label / Is tea safe,maybe"),
    ],
}
