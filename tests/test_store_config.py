"""Run store (atomic artifacts, manifest, resumable checkpoints) and the validated YAML config."""

import json

import pandas as pd
import pytest
import torch

from refusalscope.errors import UserError
from refusalscope.run.config import config_from_dict, dump_config, load_config, preset_names
from refusalscope.run.store import Checkpoint, RunStore, atomic_write_json, read_json, read_tensors


def test_stage_records_artifacts_and_skips_when_hash_matches(tmp_path):
    store = RunStore(tmp_path / "run")
    with store.stage("s1", "abc") as st:
        st.json("meta.json", {"x": 1})
        st.tensors("t.safetensors", {"a": torch.arange(3.0)}, metadata={"layer": 4})
        st.table("rows.parquet", pd.DataFrame({"k": [1, 2]}))
        st.summary = {"n": 2}
    again = RunStore(tmp_path / "run")  # a new process reads the manifest back
    assert again.is_done("s1", "abc") and not again.is_done("s1", "other")
    assert read_json(again.path("s1", "meta.json")) == {"x": 1}
    assert read_tensors(again.path("s1", "t.safetensors"))["a"].tolist() == [0.0, 1.0, 2.0]
    assert again.status("s1")["summary"] == {"n": 2}
    again.path("s1", "rows.parquet").unlink()  # a lost artifact makes the stage stale
    assert not again.is_done("s1", "abc")


def test_failed_stage_is_marked_and_not_done(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.stage("s", "h"):
            raise RuntimeError("boom")
    assert store.status("s")["status"] == "failed" and not store.is_done("s", "h")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checkpoint_resumes_and_ignores_torn_tail(tmp_path):
    ck = Checkpoint(tmp_path / "items.partial.jsonl", key="id")
    ck.add({"id": "a", "v": 1})
    ck.add({"id": "b", "v": 2})
    with open(ck.path, "a") as f:
        f.write('{"id": "c", "v"')  # killed mid-write
    again = Checkpoint(ck.path, key="id")
    assert "a" in again and "b" in again and "c" not in again and len(again) == 2
    again.add({"id": "c", "v": 3})
    assert len(Checkpoint(ck.path, key="id")) == 3


def test_config_presets_and_unknown_keys(tmp_path):
    assert {"demo", "gemma-2-2b-it", "llama-3.1-8b-it"} <= set(preset_names())
    g = load_config("gemma-2-2b-it")
    assert g.saes.release == "gemma-scope-2b-pt-res-canonical" and g.model.refusal_tokens == ["I"]
    with pytest.raises(UserError, match="unknown key 'model.sorce'"):
        config_from_dict({"model": {"sorce": "x"}})
    with pytest.raises(UserError, match="unknown preset"):
        load_config("nope")
    f = tmp_path / "c.yaml"
    f.write_text("preset: llama-3.1-8b-it\nmodel:\n  batch_size: 4\n")
    c = load_config(f)
    assert c.model.batch_size == 4 and c.model.source == "meta-llama/Llama-3.1-8B-Instruct"
    assert load_config(f).model_dump() == c.model_dump()  # round trip is stable
    f.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(f)
    f.write_text("generation:\n  max_new_tokens: 0\n")
    with pytest.raises(UserError, match="generation.max_new_tokens"):
        load_config(f)
    assert "source: demo" in dump_config(load_config(None))


@pytest.mark.parametrize("preset", ["demo", "gemma-2-2b-it", "gemma-2-2b-it-16k", "llama-3.1-8b-it"])
def test_a_saved_config_reads_back_with_the_same_stage_hashes(preset, tmp_path):
    """`config.yaml` in a run directory is what `-r` alone reuses: reading it back must not
    change a single stage hash (a default int in a float list once did, rerunning clamping)."""
    from refusalscope.run.stages import hashes as stage_hashes

    cfg = load_config(preset)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert stage_hashes(load_config(str(tmp_path / "config.yaml"))) == stage_hashes(cfg)
