"""The planted world with redundant refusal (tests/planted_hydra.py), and the pipeline finding its
dormant "hydra" latent: the world keeps its contract (the latent is silent on every clean token,
the repair keeps the refusal when the active latents are ablated, ablating the latent too
jailbreaks), and a whole `refusalscope run` reports the paper's finding from it: prompts whose
jailbreak is lost without the inactive latent, and the latent waking up where the repair fires."""

import json

import pytest
import torch
from planted import HARMFUL, HARMLESS, planted_world
from planted_hydra import HYDRA, HYDRA_ID, REPAIR_LAYER, hydra_world

from refusalscope.interventions.engine import intervene
from refusalscope.interventions.spec import FeatureAblation
from refusalscope.methods.evaluate import refusal_probs


@pytest.fixture(scope="module")
def world():
    return hydra_world()


def _hydra_pre(model, saes, prompts, shared=()):
    """The hydra latent's pre-activation on every token [B, T] and the real-token mask."""
    batch = model.encode(list(prompts))
    with intervene(model, saes, shared=shared):
        res = model.residuals(batch, [REPAIR_LAYER])[REPAIR_LAYER]
    sae = saes.saes[REPAIR_LAYER]
    pre = (res @ sae.W_enc[:, HYDRA].detach()).detach()
    return pre, batch.attention_mask.bool(), float(sae.threshold[HYDRA].detach())


def test_the_hydra_latent_sleeps_on_clean_prompts_and_wakes_under_ablation(world):
    model, saes = world
    pre, mask, thr = _hydra_pre(model, saes, HARMFUL + HARMLESS)
    assert pre[mask].max() < thr  # silent on every clean token: inactive on every prompt
    active_only = [FeatureAblation({1: (0,)})]
    pre, mask, thr = _hydra_pre(model, saes, HARMFUL, active_only)
    assert (pre[:, -1] > thr).all()  # awake at the decision token of every harmful prompt
    # the repair neuron is silent on clean prompts: the refusal is the planted world's
    plain, _ = planted_world()
    assert torch.allclose(refusal_probs(model, None, HARMFUL), refusal_probs(plain, None, HARMFUL), atol=0.01)
    kept = refusal_probs(model, saes, HARMFUL, shared=active_only)
    broken = refusal_probs(model, saes, HARMFUL, shared=[FeatureAblation({1: (0,), REPAIR_LAYER: (HYDRA,)})])
    assert kept.min() > 0.5 and broken.max() < 0.1


def test_the_pipeline_finds_the_dormant_latent_and_where_it_wakes(hydra_run):
    summary = json.loads((hydra_run / "manifest.json").read_text())["stages"]
    sets = [json.loads(line) for line in (hydra_run / "stage2" / "sets.jsonl").read_text().splitlines()]
    with_hydra = [s for s in sets if s["set"] and HYDRA_ID in s["inactive"]]
    assert with_hydra and all(HYDRA_ID not in s["active"] for s in with_hydra)
    crit = summary["hydra"]["summary"]["inactive_critical"]
    assert crit["lost_without_inactive"] >= 1 and crit["jailbroken_active_only"] < crit["jailbroken_full"]
    wake = json.loads((hydra_run / "hydra" / "wake_up.json").read_text())
    assert wake["summary"]["impact"] == "ids"  # picked by the paper's rule, not the P("I") fallback
    records = {r["id"]: r for r in json.loads((hydra_run / "hydra" / "inactive_critical.json").read_text())["records"]}
    woken = [w for r in wake["records"] for w in r["woken"]]
    assert woken and {w["feature"] for w in woken} == {HYDRA_ID}
    for r in wake["records"]:
        assert records[r["id"]]["jailbroken"] == {**records[r["id"]]["jailbroken"], "full": True, "active": False}
        last = r["n_tokens"] - 1  # the repair fires at the decision token
        firings = [f for w in r["woken"] for f in w["firings"]]
        assert any(f["position"] == last and f["region"] == "post_instruction" for f in firings)
    assert wake["summary"]["n_woken"] == len(woken) and wake["summary"]["woken_share"] > 0


def test_the_hydra_world_is_the_same_every_time(world):
    model, saes = world
    again, saes2 = hydra_world()
    for a, b in zip(model.hf.parameters(), again.hf.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(saes.saes[REPAIR_LAYER].threshold, saes2.saes[REPAIR_LAYER].threshold)
