"""The wide planted world, CI-sized (`planted_world.py --wide --small`: a Gemma2ForCausalLM with 20
layers, Gemma Scope-format JumpReLU SAEs 32x its width on every layer): the whole pipeline runs
and its planted latents flip refused prompts. (The in-process pipeline run on it stops at Stage 1:
l* falls below layer 2 in this tiny model; see docs/wide.md.)"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def wide_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide") / "world"
    info = _bench("planted_world").build_world(root, "gemma-2-2b", small=True, wide=True, n_stats=96,
                                               log=lambda *_: None)
    return root, info


def test_wide_world_has_the_issue_shape_and_its_planted_latents_flip_refusals(wide_world):
    root, info = wide_world
    assert (info["layers"], info["d_sae"], info["d_model"], info["format"]) == (20, 2048, 64, "gemma_scope")
    assert sorted(map(int, info["planted"])) == list(range(20))
    n_harmful = len((root / "prompts" / "harmful_test.jsonl").read_text().splitlines())
    assert n_harmful >= 100
    assert info["check"]["harmful_refused"] > 0.5 and info["check"]["flipped_of_refused"] > 0.5
    cfg = (root / "config.yaml").read_text()
    assert "width_2k/" in cfg and "gemma-2-2b-it" in cfg
