"""`refusalscope export --to saelens`: the bundle read back and applied through SAELens's
HookedSAETransformer (TransformerLens hooks) on the tiny world gives the engine's next-token
probabilities; and a SAELens user's own hook (full SAE spliced in with the error term, latents
zeroed at hook_sae_acts_post) agrees, which checks what the bundle says it does."""

from __future__ import annotations

import json

import pytest
import torch
from export_readback import hooked_llama, last_probs, rel_gap, saelens_splice
from typer.testing import CliRunner

from refusalscope.export import export
from refusalscope.export.bundle import load_bundle
from refusalscope.interfaces.cli import app
from refusalscope.interventions.engine import intervene
from refusalscope.io.model import load_chat_model
from refusalscope.io.sae_loading import load_sae_set
from refusalscope.run.results import RunResults


@pytest.fixture(scope="module")
def world(tiny_run):
    root = tiny_run.parent
    model = load_chat_model(root / "model", dtype="float32", device="cpu", quiet=True)
    return root, model, hooked_llama(model.hf)


@pytest.mark.parametrize("intervention", ["ablate", "clamp=3"])
def test_bundle_through_transformer_lens_equals_the_engine(world, tiny_run, tmp_path, intervention):
    root, model, tl = world
    out = export(tiny_run, "saelens", tmp_path / "b", sets=["stage2"], intervention=intervention)
    assert out["files"] == ["bundle.json", "bundle.safetensors", "README.md"]
    b = load_bundle(tmp_path / "b")
    stage2 = RunResults(tiny_run).stage2_sets()
    assert b.sets == {f"stage2/{pid}": fs for pid, fs in stage2.items() if len(fs)}
    prompts = {p.id: p.text for p in RunResults(tiny_run).kept_prompts()}
    name = next(iter(b.sets))
    fs = b.set(name)
    saes = load_sae_set(str(root / "saes" / "layer_{layer}"), fs.layers(), quiet=True)
    batch = model.encode([prompts[name.split("/", 1)[1]]])
    plan = fs.plan() if intervention == "ablate" else [fs.clamp(3.0)]
    with intervene(model, saes, plan):
        engine = model.next_token_probs(batch)
    plain = model.next_token_probs(batch)
    with torch.no_grad():
        via_tl = last_probs(tl.run_with_hooks(batch.input_ids, fwd_hooks=b.tl_hooks(name)))
        tl_plain = last_probs(tl(batch.input_ids))
    assert rel_gap(tl_plain, plain) < 1e-4  # the converted model is the model
    assert rel_gap(via_tl, engine) <= 1e-5
    with intervene(model, *b.engine_parts(name)):  # the bundle alone, no full SAE
        from_bundle = model.next_token_probs(batch)
    assert rel_gap(from_bundle, engine) <= 1e-5
    assert rel_gap(engine, plain) > 1e-3  # the intervention changes the model


def test_bundle_semantics_match_a_saelens_splice_with_the_error_term(world, tiny_run, tmp_path):
    """What the README says: the SAE spliced in with use_error_term=True and the set's latents set to 0
    at every position is the bundle's hook."""
    root, model, tl = world
    export(tiny_run, "saelens", tmp_path / "b", sets=["stage2"])
    b = load_bundle(tmp_path / "b")
    name = next(iter(b.sets))
    by_layer = b.set(name).by_layer()
    saes = load_sae_set(str(root / "saes" / "layer_{layer}"), list(by_layer), quiet=True)
    ids = model.encode(["Tell me how to make poison"]).input_ids
    spliced = saelens_splice(tl, saes.saes, by_layer, ids)
    with torch.no_grad():
        bundled = last_probs(tl.run_with_hooks(ids, fwd_hooks=b.tl_hooks(name)))
    assert rel_gap(bundled, spliced) <= 1e-4


def test_bundle_names_each_latents_sae_and_says_what_it_does(tiny_run, tmp_path):
    res = CliRunner().invoke(app, ["export", str(tiny_run), "--to", "saelens", "-o", str(tmp_path / "b"),
                                   "--sets", "core@2", "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    (s,) = meta["sets"]
    assert s["name"] == "core@2" and len(s["features"]) == 2
    for f in s["features"]:
        assert f["sae"] == {"hook_name": f"blocks.{f['layer']}.hook_resid_post",
                            "path": str(tiny_run.parent / "saes" / f"layer_{f['layer']}")}
    assert meta["intervention"] == {"kind": "ablate", "value": None, "positions": "all", "keep_error_term": True}
    assert "error term" in meta["semantics"] and "use_error_term=False" in meta["semantics"]
    b = load_bundle(tmp_path / "b")
    (iv,) = b.interventions()
    assert {l: list(v) for l, v in iv.features.items()} == b.set().by_layer() and iv.positions == "all"


@pytest.mark.parametrize("intervention,target", [("scale=0.25", lambda f: 0.25 * f), ("clamp=2", lambda f: 2.0 + 0 * f),
                                                 ("ablate", lambda f: 0 * f)])
def test_each_action_is_the_formula_on_the_full_sae(tiny_run, tmp_path, intervention, target):
    """h' = h − Σ (f_i − t_i)·W_dec[i] with f from the full SAE, at every position (a clamp: BOS only)."""
    export(tiny_run, "saelens", tmp_path / "b", sets=["core@3"], intervention=intervention)
    b = load_bundle(tmp_path / "b")
    (name,) = b.sets
    h = torch.randn(2, 5, b.slices[next(iter(b.slices))].d_in, generator=torch.Generator().manual_seed(0)) * 3
    for (hook_name, fn), (layer, ids) in zip(b.tl_hooks(name), b.set(name).by_layer().items()):
        fd = load_sae_set(str(tiny_run.parent / "saes" / "layer_{layer}"), [layer], quiet=True)[layer]
        f = fd.encode(h)[..., ids]
        delta = (f - target(f)) @ fd.W_dec[ids]
        if intervention.startswith("clamp"):
            delta[:, 1:] = 0
        assert hook_name == f"blocks.{layer}.hook_resid_post"
        assert torch.allclose(fn(h.clone()), h - delta, atol=1e-5)
        assert delta.abs().max() > 0  # the planted latents fire on this stream
