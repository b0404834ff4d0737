"""Every `export --to` format written from a finished run by the CLI in its own process, and read back
by the tool it is for (issue 22's "done when"): the run is the one REFUSALSCOPE_DEMO_RUN names, the
demo run in practice (benchmarks/export_demo.py); without it every test skips. Nothing here depends on
the demo's numbers: each check reads what it compares with from the run, the SAE files or the tool.

Tolerances: the SAELens bundle through TransformerLens (float64) equals SAELens's own splice to 1e-5
relative, and the engine to 1e-5 plus three times the gap the two implementations show with no
intervention (TransformerLens's converted SmolLM2 and transformers differ by ~3e-5 relative in
next-token probabilities, 1.4e-5 even in float64); the bundle alone through the engine equals the full
SAEs to 1e-5 in the run's dtype. The abliterated folder reports (`abliteration.json`: check) how far its
logits lie from the direction-ablation hooks on one refused prompt; reloaded, it stays within that, and,
when it says it is exact, that gap and the gap on other prompts are float rounding: at most 1e-4 of the
logits' scale (SmolLM2 in float32: 3e-6)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from export_readback import (
    REPO,
    as_release,
    check_gap,
    forward_logits,
    hooked_llama,
    hooked_logits,
    last_probs,
    lm_eval_clamp_by_hand,
    rel_gap,
    sae_folders,
    saelens_splice,
    schema,
)

from refusalscope.errors import UserError
from refusalscope.export.selection import sae_source
from refusalscope.run.results import RunResults

pytestmark = pytest.mark.demo
ENV = "REFUSALSCOPE_DEMO_RUN"
NEEDED = ("filter", "direction", "stage1", "stage2")
N_PROMPTS = 3  # CPU-light: the shortest few prompts with a Stage 2 set
NP_ID = "refusalscope-test/{layer}-res-test"  # a Neuronpedia id for the schema checks (the demo has none)


def finished_run() -> Path:
    """The run REFUSALSCOPE_DEMO_RUN names, or a skip saying why these tests cannot run."""
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"{ENV} is unset: point it at a finished demo run to read every export back from it")
    try:
        res = RunResults(value)
    except UserError as err:
        pytest.skip(f"{ENV}={value} is not a run directory ({err})")
    cfg = res.config()
    unfinished = [s for s in NEEDED if not res.done(s)] + [
        s for s, st in res.stages().items() if st.get("status") != "done"]
    if cfg is None or unfinished:
        pytest.skip(f"{ENV}={value} is not a finished run ({'no config.yaml' if cfg is None else 'stages not done: '}"
                    f"{', '.join(dict.fromkeys(unfinished))})")
    if cfg.model.source == "demo":
        from refusalscope.demo.world import is_built

        if not is_built():
            pytest.skip("the demo world is not built: these tests read it and never build it")
    return res.root


def cli_export(run: Path, fmt: str, out: Path, *extra: str) -> dict:
    """`refusalscope export RUN --to FMT -o OUT --json` in a new process; its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "refusalscope", "export", str(run), "--to", fmt, "-o", str(out),
                           "--json", *extra], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def run():
    return finished_run()


@pytest.fixture(scope="module")
def res(run):
    return RunResults(run)


@pytest.fixture(scope="module")
def model(res):
    from refusalscope.run.resolve import load_model

    return load_model(res.config(), quiet=True, log=lambda _: None)


@pytest.fixture(scope="module")
def prompts(res) -> dict[str, str]:
    """{prompt id: text} of the shortest few refused prompts that have a Stage 2 set."""
    sets = {pid for pid, fs in res.stage2_sets().items() if len(fs)}
    kept = sorted((p for p in res.kept_prompts() if p.id in sets), key=lambda p: len(p.text))[:N_PROMPTS]
    assert kept, "the run found no Stage 2 set: nothing to export"
    return {p.id: p.text for p in kept}


def test_neuronpedia_bodies_validate_and_local_saes_get_a_note(run, res, tmp_path):
    import jsonschema

    src = sae_source(res)
    if src.neuronpedia_id is None:  # the demo's SAEs: a note, no dead links
        out = cli_export(run, "neuronpedia", tmp_path / "note")
        assert out["files"] == ["README.md"] and any("no public Neuronpedia pages" in n for n in out["notes"])
        assert sorted(p.name for p in (tmp_path / "note").iterdir()) == ["README.md"]
    s2 = res.stage2_sets()
    found = {pid: fs for pid, fs in s2.items() if len(fs)}
    layers = sorted({f.layer for fs in found.values() for f in fs})
    view, _ = as_release(run, tmp_path / "np", sae_folders(run, layers) if src.kind != "release" else {},
                         neuronpedia_id=NP_ID)
    out = cli_export(view, "neuronpedia", tmp_path / "np" / "out", "--sets", "stage2", "--sets", "core@2")
    assert out["files"] == ["quick_lists.md", "lists.json", "vector.json"]
    bodies = json.loads((tmp_path / "np" / "out" / "lists.json").read_text())
    assert len(bodies) == sum(-(-len(fs) // 100) for fs in found.values()) + 1  # 100 latents a body at most
    for body in bodies:
        jsonschema.validate(body, schema("list"))
        for f in body["features"]:
            layer = int(f["layer"].split("-")[0])
            assert f["modelId"] == "refusalscope-test" and f["layer"] == f"{layer}-res-test"
            n = sum(f"{layer}-{f['index']}" in fs.ids() for fs in s2.values())
            assert f"in {n} of {len(s2)} Stage 2 sets" in f["description"]
    vector = json.loads((tmp_path / "np" / "out" / "vector.json").read_text())
    jsonschema.validate(vector, schema("vector"))
    assert vector["layerNumber"] == res.direction()[1]
    assert vector["vector"] == pytest.approx(res.direction_vector().tolist(), rel=1e-6)
    links = [ln for ln in (tmp_path / "np" / "out" / "quick_lists.md").read_text().splitlines() if ln.startswith("- [")]
    back = set()
    for link in links:
        feats = json.loads(parse_qs(urlparse(link[link.index("(") + 1:link.rindex(") (")]).query)["features"][0])
        jsonschema.validate(feats, schema("quick_list"))
        back |= {(int(f["layer"].split("-")[0]), int(f["index"])) for f in feats}
    assert {(f.layer, f.index) for fs in found.values() for f in fs} <= back


def test_tables_parse_and_are_the_runs_tables(run, res, tmp_path):
    from refusalscope.export.tables import run_tables, slug

    out = cli_export(run, "tables", tmp_path / "t")
    tables = run_tables(res)
    assert tables and len([n for n in out["files"] if n.endswith(".csv") and n != "eval__matrix.csv"]) == len(tables)
    for stage, title, rows in tables:
        name = tmp_path / "t" / f"{stage}__{slug(title)}"
        with open(f"{name}.csv", newline="") as fh:
            parsed = list(csv.DictReader(fh))
        assert parsed == [{k: "" if r.get(k) is None else str(r.get(k)) for k in parsed[0]} for r in rows]
        if title.startswith(("Table ", "Tables ")):
            tex = Path(f"{name}.tex").read_text()
            body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0].strip().splitlines()
            assert "\\caption{" in tex and len(body) == len(rows)
            assert all(line.endswith("\\\\") and line.count(" & ") == len(parsed[0]) - 1 for line in body)
    s = res.summary("stage2")  # Table 1 against the stage's own summary
    (t1,) = [p for p in (tmp_path / "t").glob("stage2__table_1_*.csv")]
    (row,) = list(csv.DictReader(t1.open()))
    assert row["unique latents"] == str(s["unique_latents"])
    assert row["jailbroken / refused"] == f"{s['jailbroken']} / {s['refused']}"
    if res.done("eval"):  # the matrix read back: same columns and rows, numbers equal
        import pandas as pd

        back, want = pd.read_csv(tmp_path / "t" / "eval__matrix.csv"), res.eval_table()
        assert list(back.columns) == list(want.columns) and len(back) == len(want) > 0
        for col in want.columns:
            if pd.api.types.is_numeric_dtype(want[col]) and not pd.api.types.is_bool_dtype(want[col]):
                pd.testing.assert_series_equal(back[col].astype(float), want[col].astype(float), rtol=1e-9)
            else:
                assert back[col].fillna("").astype(str).tolist() == want[col].fillna("").astype(str).tolist(), col
    else:
        assert out["notes"] == ["no eval matrix: `refusalscope eval` has not run on this run directory"]


def _model_folder(cfg) -> Path | None:
    if cfg.model.source == "demo":
        from refusalscope.demo.world import model_dir

        return model_dir() / "model"
    folder = Path(cfg.model.source)
    return folder if (folder / "config.json").is_file() and not cfg.model.gguf_file else None


def test_lm_eval_steered_model_loads_the_csv(run, res, model, prompts, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from lm_eval.models.hf_steered import SteeredModel

    from refusalscope.methods.eval_matrix import core_set

    (feat,) = core_set(res.stage2_sets(), 1)
    found = [fs for fs in res.stage2_sets().values() if len(fs)]
    out = cli_export(run, "lm-eval", tmp_path / "own", "--sets", "stage2")  # the run as it is: notes say the limits
    crowded = [fs for fs in found if any(len(v) > 1 for v in fs.by_layer().values())]
    assert len(out["files"]) == len(found) + 1
    assert any(f"{len(crowded)} set(s) have several latents on one layer" in n for n in out["notes"]) == bool(crowded)
    folder = _model_folder(res.config())
    if folder is None:
        pytest.skip("the run's model is not a local transformers folder: lm-eval's steered model needs one")
    view, hub = as_release(run, tmp_path / "rel", sae_folders(run, [feat.layer]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = cli_export(view, "lm-eval", tmp_path / "out", "--sets", "core@1")
    assert out["notes"] == [] and out["files"] == ["core@1.csv", "sets.json"]
    path = tmp_path / "out" / "core@1.csv"
    assert path.read_text().splitlines()[1] == (f"sae_lens,clamp,{REPO},layers.{feat.layer},{feat.index},0.0,,"
                                                f"layer_{feat.layer},refusalscope core@1 {feat}")
    lm = SteeredModel(pretrained=str(folder), steer_path=str(path), device="cpu", dtype="float32")
    ids = model.encode([next(iter(prompts.values()))]).input_ids
    steered = lm._model_call(ids)
    expected = lm_eval_clamp_by_hand(lm.model, ids, feat.layer, sae_folders(run, [feat.layer])[feat.layer],
                                     feat.index)
    with torch.no_grad():
        plain = lm.model(ids).logits
    scale = float(expected.abs().max())
    assert (steered - expected).abs().max() <= 1e-5 * max(1.0, scale)
    assert (steered - plain).abs().max() > 1e-3  # the clamp changes the model


def test_saelens_bundle_through_transformer_lens_equals_the_engine(run, res, model, prompts, tmp_path):
    """In float64 TransformerLens the bundle's hooks equal SAELens's own splice to 1e-5; against the engine
    (transformers, the run's dtype) the gap may exceed 1e-5 by what the two implementations differ with no
    intervention, taken three times (on SmolLM2 with direction ablations at three layers, the gap with
    the intervention was up to 1.5 times the gap without)."""
    from sae_lens import SAE

    from refusalscope.export.bundle import load_bundle
    from refusalscope.interventions.engine import intervene
    from refusalscope.run.resolve import load_saes

    out = cli_export(run, "saelens", tmp_path / "b", "--sets", "stage2")
    assert out["files"] == ["bundle.json", "bundle.safetensors", "README.md"]
    b = load_bundle(tmp_path / "b")
    assert b.sets == {f"stage2/{pid}": fs for pid, fs in res.stage2_sets().items() if len(fs)}
    saes = load_saes(res.config(), model, quiet=True)
    engine, plain = {}, {}
    for pid, text in prompts.items():  # the bundle alone (no full SAE) through the engine, the run's dtype
        fs, batch = b.set(f"stage2/{pid}"), model.encode([text])
        with intervene(model, saes, fs.plan()):
            engine[pid] = model.next_token_probs(batch).double()
        with intervene(model, *b.engine_parts(f"stage2/{pid}")):
            assert rel_gap(model.next_token_probs(batch), engine[pid]) <= 1e-5
        plain[pid] = model.next_token_probs(batch).double()
        assert rel_gap(engine[pid], plain[pid]) > 1e-3  # the set changes the model
    if model.hf.config.model_type != "llama":
        pytest.skip(f"TransformerLens conversion here is for Llama; the run's model is {model.hf.config.model_type}")
    tl = hooked_llama(model.hf, torch.float64)
    for pid, text in prompts.items():
        name, ids = f"stage2/{pid}", model.encode([text]).input_ids
        by_layer = b.set(name).by_layer()
        with torch.no_grad():
            via_tl = last_probs(tl.run_with_hooks(ids, fwd_hooks=b.tl_hooks(name)))
            conversion = rel_gap(last_probs(tl(ids)), plain[pid])  # the two implementations, no intervention
        saes64 = {l: SAE.load_from_disk(f, dtype="float64") for l, f in sae_folders(run, by_layer).items()}
        assert rel_gap(via_tl, saelens_splice(tl, saes64, by_layer, ids)) <= 1e-5
        assert rel_gap(via_tl, engine[pid]) <= 1e-5 + 3 * conversion


def test_steering_vectors_apply_the_direction_as_actadd(run, res, model, prompts, tmp_path):
    from safetensors.torch import load_file

    from refusalscope.export.steering import load_steering_vectors
    from refusalscope.interventions.engine import intervene
    from refusalscope.interventions.spec import ActAdd

    cli_export(run, "steering", tmp_path / "sv", "--sets", "stage2")
    vectors = load_steering_vectors(tmp_path / "sv")
    _, layer = res.direction()
    sv = vectors["refusal_direction"]
    assert list(sv.layer_activations) == [layer] and sv.layer_type == "decoder_block"
    batch = model.encode(list(prompts.values()))
    real = batch.attention_mask.bool()
    with intervene(model, None, [ActAdd(res.direction_vector(), layer)]):
        ours = model.logits(batch, last=None)
    with sv.apply(model.hf):
        theirs = forward_logits(model.hf, batch)
    plain = model.logits(batch, last=None)
    assert (theirs[real] - ours[real]).abs().max() <= 1e-5 * max(1.0, float(ours[real].abs().max()))
    assert (ours[real] - plain[real]).abs().max() > 1e-2
    sets = res.stage2_sets()
    w_dec: dict[int, torch.Tensor] = {}
    for pid in prompts:  # each set's vector per layer: its decoder rows summed, from the SAE files by hand
        for l, ids in sets[pid].by_layer().items():
            if l not in w_dec:
                w_dec[l] = load_file(str(sae_folders(run, [l])[l] / "sae_weights.safetensors"))["W_dec"]
            want = sum(w_dec[l][i] for i in ids)
            assert torch.allclose(vectors[f"stage2/{pid}"].layer_activations[l], want.float(), atol=1e-6)


def test_abliterated_folder_loads_with_transformers_and_equals_the_hooks(run, res, model, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cli_export(run, "model", tmp_path / "abl")
    folder = tmp_path / "abl"
    assert any("removes a safety safeguard" in n for n in out["notes"])
    meta = json.loads((folder / "abliteration.json").read_text())
    direction, layer = res.direction()
    assert meta["layer"] == layer
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.chat_template == model.tokenizer.chat_template  # the template travels
    abl = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).eval()
    check = meta["check"]  # the export's own comparison with the hooks, on one refused prompt
    assert check["prompt"] in {p.text for p in res.kept_prompts()}
    gap = check_gap(abl, model.hf, model.encode([check["prompt"]]).input_ids, direction)
    assert gap <= check["max_abs_logit_gap"] + 1e-5 * max(1.0, check["max_abs_logit"])  # what the export reports
    if not meta["exact"]:
        pytest.skip(f"abliteration.json says the edit is not exact for {model.hf.config.model_type}: no equality")
    assert check["max_abs_logit_gap"] <= 1e-4 * max(1.0, check["max_abs_logit"])  # exact: float rounding only
    batch = model.encode(list(prompts.values()))  # more refused (harmful) prompts, batched with padding
    real = batch.attention_mask.bool()
    got = forward_logits(abl, batch)[real]
    want = hooked_logits(model.hf, batch, direction)[real]
    plain = forward_logits(model.hf, batch)[real]
    tol = 1e-4 * max(1.0, float(want.abs().max()))
    assert (got - want).abs().max() <= tol
    assert (want - plain).abs().max() > 10 * tol  # the direction matters far beyond the tolerance
