"""The long analyses resume from what they wrote: taxonomy, semantics and ce_loss per chunk of rows
(`*.partial.jsonl` checkpoints), the dashboards per layer of their corpus pass (`layer-L.partial.jsonl`). Each stage is
run again on a copy of the tiny reference run, SIGKILLed inside its own second checkpoint line or
layer file (a real process, `tests/faults.py`), resumed with the same command, and then
- the resumed process redoes only what the killed one had not finished (its own appends / layer
  writes, counted, are the uninterrupted stage's minus the finished ones), and
- the run is identical to the uninterrupted reference (artifacts byte for byte, manifest minus
  timings)."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from faults import run_cli
from planted import HARMFUL, HARMLESS, planted_world

from refusalscope.artifacts import Checkpoint, atomic_write_jsonl, read_jsonl
from refusalscope.io.prompts import Prompt
from refusalscope.methods import semantics, taxonomy
from refusalscope.run.compare import compare_runs


def _as_if_never_run(run, stage: str) -> None:
    """The stage marked failed with an empty folder: what a kill before its first write leaves."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][stage]["status"] = "failed"
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(run / stage)
    (run / stage).mkdir()


def _chunk_records(run, stage: str) -> int:
    return sum(len(read_jsonl(p)) for p in (run / stage).glob("*.partial.jsonl"))


def _layers(run) -> int:
    return len({json.loads(line)["feature"].split("-")[0]
                for line in (run / "dashboards" / "dashboards.jsonl").read_text().splitlines()})


@pytest.mark.parametrize("stage, kind, where", [
    ("taxonomy", "append", "taxonomy/"),  # views.partial.jsonl, then candidates.partial.jsonl
    ("semantics", "append", "semantics/top_activations"),
    ("ce_loss", "append", "ce_loss/"),
    ("dashboards", "write", "dashboards/layer-"),
])
def test_killed_analysis_resumes_from_its_checkpoint_to_the_same_bytes(tiny_world, tiny_reference, tmp_path,
                                                                         stage, kind, where):
    ref, _ = tiny_reference
    units = _layers(ref) if stage == "dashboards" else _chunk_records(ref, stage)
    assert units >= 2, f"the tiny world gives {stage} {units} unit(s) of work: nothing to resume between"
    trial = tmp_path / "trial"
    shutil.copytree(ref, trial)
    _as_if_never_run(trial, stage)
    cmd = ("analyze", stage, "-c", str(tiny_world / "cfg.yaml"), "-r", str(trial), "-q")

    killed = run_cli(f"kill@{kind}:2~{where}", *cmd)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if kind == "append":  # one chunk finished, the second torn mid-line
        assert _chunk_records(trial, stage) == 1
    else:  # the first layer's file in place, the second's temp file half written
        assert len(list((trial / stage).glob("layer-*.partial.jsonl"))) == 1
        assert list((trial / stage).glob(".layer-*.tmp*"))

    counts = tmp_path / "counts.json"
    resumed = run_cli(f"count:{counts}~{where}", *cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(counts.read_text())[kind] == units - 1  # the finished unit was not redone
    assert compare_runs(ref, trial) == []
    assert not list((trial / stage).glob("layer-*")), "the layers' files outlived the finished stage"


def _resumed(tmp_path, name: str, run, keep) -> tuple[object, list[int]]:
    """`run(checkpoint)` once through, then again from a checkpoint holding only the chunks whose
    start `keep` picks (as a kill leaves it): the second result, and the chunks it computed."""
    whole = Checkpoint(tmp_path / f"{name}-whole.partial.jsonl", key="start")
    first = run(whole)
    part = tmp_path / f"{name}.partial.jsonl"
    atomic_write_jsonl(part, [r for s, r in whole.records.items() if keep(s)])
    ck = Checkpoint(part, key="start")
    before = set(ck.records)
    again = run(ck)
    assert again == first
    return again, sorted(set(ck.records) - before)


def test_chunk_checkpoints_restore_every_chunk_as_computed(tmp_path):
    """Chunks restored at any row offset (not only the first) give the plain pass's numbers, and only
    the chunks missing from the checkpoint run."""
    model, saes = planted_world()
    texts = HARMFUL + HARMLESS[:5]  # 13 texts in chunks of 3: starts 0, 3, 6, 9, 12
    feats = [f"{l}-{i}" for l in range(4) for i in (0, 1, 5, 17, 40, 77, 100, 127)]
    prompts = [Prompt(t, id=f"p{j}", category=taxonomy.UNSAFE_CATEGORIES[j % 5]) for j, t in enumerate(texts)]
    plain = taxonomy.category_views(model, saes, prompts, feats, batch_size=3)
    got, ran = _resumed(tmp_path, "views", lambda ck: taxonomy.category_views(model, saes, prompts, feats,
                                                                                batch_size=3, checkpoint=ck),
                        keep=lambda s: s in (3, 9, 12))
    assert got == plain and ran == [0, 6]
    assert any(n for view in plain for counts in view.values() for n in counts.values())  # something fired

    plain_top = semantics.top_activations(model, saes, texts, feats, k=3, batch_size=3)
    got, ran = _resumed(tmp_path, "top", lambda ck: semantics.top_activations(model, saes, texts, feats, k=3,
                                                                                batch_size=3, checkpoint=ck),
                        keep=lambda s: s != 6)
    assert got == plain_top and ran == [6]
    assert sum(len(v) for v in plain_top.values()) > 10
