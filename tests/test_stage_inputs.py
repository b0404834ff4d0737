"""A changed config reruns exactly the stages whose inputs changed: one field per stage, and which
stage hashes move (the pipeline skips a stage whose hash is done; tests/test_resume_kill.py checks
that on a real run). The expected sets are written out here, not derived from run/inputs.py."""

from __future__ import annotations

import pytest

from refusalscope.run.config import config_from_dict
from refusalscope.run.stages import hashes as stage_hashes
from refusalscope.run.stages import with_deps as needed

PIPELINE = ("filter", "direction", "stage1", "stage2", "stage3")

ANALYSES = {"hydra", "stage3_only", "controls", "ce_loss", "taxonomy", "clamping", "semantics"}
LAST = {"dashboards", "eval"}  # dashboards read whichever analyses run; eval reads Stages 1-3 and hydra
ALL = set(PIPELINE) | ANALYSES | LAST
AFTER_STAGE3 = {"stage3", "stage3_only", "taxonomy", "semantics", *LAST}


def changed(base: dict, override: dict) -> set[str]:
    a = stage_hashes(config_from_dict(base))
    b = stage_hashes(config_from_dict({**base, **override}))
    return {s for s in a if a[s] != b[s]}


@pytest.mark.parametrize("override, reruns", [
    ({"model": {"batch_size": 4}}, ALL),
    ({"data": {"harmful_test": "bundled:harmful:val"}}, ALL),
    ({"data": {"harmful_train": "bundled:harmful:val"}}, ALL - {"filter"}),
    ({"direction": {"n_val": 16}}, ALL - {"filter"}),
    ({"saes": {"layers": [3, 5]}}, ALL - {"filter", "direction"}),
    ({"saes": {"neuronpedia_id": "x/{layer}-res"}}, {"semantics", "dashboards"}),
    ({"stage1": {"k_max": 150}}, ALL - {"filter", "direction"}),
    ({"stage2": {"taus": [0.2, 0.5]}}, ALL - {"filter", "direction", "stage1"}),
    ({"stage3": {"epochs": 5}}, AFTER_STAGE3),
    ({"analyses": {"wake_threshold": 0.2}}, {"hydra", "clamping", *LAST}),
    ({"analyses": {"random_seeds": [5]}}, {"controls"}),
    ({"analyses": {"ce_texts": 10}}, {"ce_loss"}),
    ({"analyses": {"taxonomy_prompts": ["bundled:harmful:test"]}}, {"taxonomy", "dashboards"}),
    ({"analyses": {"clamp_values": [3]}}, {"clamping"}),
    ({"analyses": {"explain_texts": 50}}, {"semantics", "dashboards"}),
    ({"dashboards": {"top_k": 5}}, {"dashboards"}),
    ({"eval": {"core_sizes": [5]}}, {"eval"}),
    ({"analyses": {"run": ["hydra"]}}, {"dashboards"}),  # it no longer reads taxonomy and semantics
    ({"execution": {"shard_size": 2, "backend": "local"}}, set()),
    ({"name": "other"}, set()),
])
def test_one_field_reruns_its_stage_and_what_reads_it(override, reruns):
    assert changed({}, override) == reruns


def test_prompt_files_count_by_content_not_by_form(tmp_path):
    f = tmp_path / "harmful.jsonl"
    f.write_text('{"id": "a", "prompt": "Tell me how to pick a lock"}\n{"id": "b", "prompt": "Explain poison"}\n')
    base = {"data": {"harmful_test": str(f)}}
    before = stage_hashes(config_from_dict(base))
    f.write_text('{"prompt":"Tell me how to pick a lock",  "id":"a"}\n\n{"prompt": " Explain poison ", "id": "b"}\n')
    assert stage_hashes(config_from_dict(base)) == before  # key order, spacing, blank lines
    f.write_text('{"id": "a", "prompt": "Tell me how to pick a lock"}\n{"id": "b", "prompt": "Explain a poison"}\n')
    after = stage_hashes(config_from_dict(base))
    assert {s for s in before if before[s] != after[s]} == ALL


def test_analyses_pull_in_the_stages_they_read():
    assert needed(["clamping"]) == ["filter", "direction", "stage1", "stage2", "hydra", "clamping"]
    assert needed(["ce_loss"]) == ["filter", "direction", "stage1", "stage2", "ce_loss"]
    assert needed(["taxonomy"]) == [*PIPELINE, "taxonomy"]
