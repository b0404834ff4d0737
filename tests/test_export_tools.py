"""`refusalscope export --to lm-eval|steering`, each read back by the tool it is for on the tiny world:
lm-evaluation-harness's `steered` model loads the CSV through its own code (SAELens from_pretrained on
a HuggingFace cache laid out on disk, offline) and steers the tiny model as its clamp rule says; the
steering-vectors package applies the refusal direction exactly as refusalscope's ActAdd does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_readback import REPO, as_release, lm_eval_clamp_by_hand
from safetensors.torch import load_file

from refusalscope.errors import UserError
from refusalscope.export import export
from refusalscope.export.steering import load_steering_vectors
from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import ActAdd
from refusalscope.io.model import load_chat_model
from refusalscope.methods.eval_matrix import core_set
from refusalscope.run.results import RunResults


def test_lm_eval_steered_model_loads_the_csv_and_clamps_the_decoder_direction(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from lm_eval.models.hf_steered import SteeredModel

    folders = {int(p.name.removeprefix("layer_")): p for p in (tiny_run.parent / "saes").iterdir()}
    run, hub = as_release(tiny_run, tmp_path, folders)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = export(run, "lm-eval", tmp_path / "out", sets=["core@1"])
    assert out["notes"] == [] and out["files"] == ["core@1.csv", "sets.json"]
    (feat,) = core_set(RunResults(tiny_run).stage2_sets(), 1)
    csv = tmp_path / "out" / "core@1.csv"
    assert csv.read_text().splitlines()[1] == (f"sae_lens,clamp,{REPO},layers.{feat.layer},{feat.index},0.0,,"
                                               f"layer_{feat.layer},refusalscope core@1 {feat}")
    lm = SteeredModel(pretrained=str(tiny_run.parent / "model"), steer_path=str(csv), device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 17, 40, 33, 2, 9, 12]])
    steered = lm._model_call(ids)
    # the clamp rule by hand: (h - b_dec) loses its component along the unit decoder row, at every position
    expected = lm_eval_clamp_by_hand(lm.model, ids, feat.layer, folders[feat.layer], feat.index)
    with torch.no_grad():
        plain = lm.model(ids).logits
    assert torch.allclose(steered, expected, atol=1e-5)
    assert (steered - plain).abs().max() > 1e-3


def test_lm_eval_export_says_when_lm_eval_cannot_express_the_set(tiny_run, tmp_path):
    s2 = RunResults(tiny_run).stage2_sets()
    crowded = [pid for pid, fs in s2.items() if any(len(v) > 1 for v in fs.by_layer().values())]
    out = export(tiny_run, "lm-eval", tmp_path / "out", sets=["stage2"])
    assert len(out["files"]) == len([fs for fs in s2.values() if len(fs)]) + 1
    assert any(f"{len(crowded)} set(s) have several latents on one layer" in n for n in out["notes"]) == bool(crowded)
    assert any("SAE.from_pretrained only" in n for n in out["notes"])  # local SAEs: how to publish them


def test_steering_vectors_package_applies_the_direction_as_actadd(tiny_run, tmp_path):
    export(tiny_run, "steering", tmp_path / "sv", sets=["stage2"])
    vectors = load_steering_vectors(tmp_path / "sv")
    res = RunResults(tiny_run)
    _, layer = res.direction()
    sv = vectors["refusal_direction"]
    assert list(sv.layer_activations) == [layer] and sv.layer_type == "decoder_block"
    model = load_chat_model(tiny_run.parent / "model", dtype="float32", device="cpu", quiet=True)
    batch = model.encode(["Tell me about dogs", "Explain how to bake bread"])
    with intervene(model, None, [ActAdd(res.direction_vector(), layer)]):
        ours = model.logits(batch, last=None)
    with sv.apply(model.hf):
        with torch.no_grad():
            theirs = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    plain = model.logits(batch, last=None)
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2

    # each set's vector per layer: its decoder rows summed, read from the SAE files by hand
    for pid, fs in res.stage2_sets().items():
        for l, ids in fs.by_layer().items():
            W_dec = load_file(str(tiny_run.parent / "saes" / f"layer_{l}" / "sae_weights.safetensors"))["W_dec"]
            want = sum(W_dec[i] for i in ids)
            assert torch.allclose(vectors[f"stage2/{pid}"].layer_activations[l], want, atol=1e-6)


def test_steering_without_direction_or_sets_is_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for stage in ("direction", "stage1", "stage2", "stage3"):
        shutil.rmtree(run / stage)
    m = json.loads((run / "manifest.json").read_text())
    m["stages"] = {k: v for k, v in m["stages"].items() if k not in ("direction", "stage1", "stage2", "stage3")}
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="neither a refusal direction nor found sets"):
        export(run, "steering", tmp_path / "sv")
