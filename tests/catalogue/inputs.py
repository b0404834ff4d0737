"""Rows: the model, the SAEs and the judge a config names."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from refusalscope.io.saes import make_jumprelu_sae, save_sae

from .core import RUN, Case, Row, cfg, edit_json, sae_copy

LAYOUTS = ("SAELens (cfg.json + sae_weights.safetensors), Gemma Scope (params.npz), Llama Scope "
           "(hyperparams.json + checkpoints/final.safetensors)")


def narrow_sae(saes: Path) -> None:
    d, m = 32, 16
    save_sae(make_jumprelu_sae(torch.randn(d, m), torch.randn(m, d), torch.zeros(m), torch.zeros(d),
                               torch.zeros(m), hook_name="blocks.1.hook_resid_post"), saes / "layer_1")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def no_template(c: Case) -> None:
    shutil.copytree(c.world / "model", c.tmp / "model")
    (c.tmp / "model" / "chat_template.jinja").unlink()
    c.cfg["model"]["source"] = str(c.tmp / "model")



GROUPS: dict[str, list[Row]] = {
    "the model": [
        Row("model-offline", "unknown model id, offline", RUN,
            "could not load model 'no-such-org/no-such-model' ({*}): without network access, download it first and "
            "pass the local folder", cfg(model={"source": "no-such-org/no-such-model"})),
        Row("model-gguf", "GGUF path wrong", RUN, "GGUF file {tmp}/model.gguf not found: check the path",
            lambda c: c.cfg["model"].update(source=str(c.tmp / "model.gguf")), given='model: {source: /data/model.gguf}'),
        Row("model-folder", "model folder that does not exist", RUN,
            "model folder {tmp}/nope not found: pass a local model folder, a .gguf file or a HuggingFace hub id",
            lambda c: c.cfg["model"].update(source=str(c.tmp / "nope")), given='model: {source: /data/nope}'),
        Row("model-no-template", "model with no chat template and none given", RUN,
            "model '{tmp}/model' has no chat template: use an instruction-tuned model or set model.chat_template in "
            "the config (refusalscope needs chat-formatted prompts)", no_template, given='model: {source: /data/model}, a tokenizer without chat_template'),
        Row("model-refusal-token", "refusal token that is several tokens", RUN,
            "refusal token 'I cannot' is 2 tokens for {model}: pick a string the tokenizer encodes as one token",
            cfg(model={"refusal_tokens": ["I cannot"]})),
    ],
    "the SAEs": [
        Row("sae-path", "wrong SAE path", RUN,
            f"SAE folder {{tmp}}/nope/layer_0 does not exist: pass a folder in one of these layouts: {LAYOUTS}",
            lambda c: c.cfg["saes"].update(path=str(c.tmp / "nope" / "layer_{layer}")), given='saes: {path: /data/nope/layer_{layer}}'),
        Row("sae-layer", "SAE for a layer the model lacks", RUN,
            "saes.layers has [99], but {model} has layers 0..3: fix saes.layers in the config",
            cfg(saes={"layers": [0, 99]})),
        Row("sae-width", "SAE d_in ≠ model width", RUN,
            "SAE for layer 1 ({tmp}/saes/layer_1) has d_in 32 but {model} has width 64: pass SAEs trained on this "
            "model's residual stream", sae_copy(narrow_sae), given='saes.path: its layer_1 folder holds an SAE with d_in 32'),
        Row("sae-architecture", "unknown SAE architecture", RUN,
            "{tmp}/saes/layer_0/cfg.json names an unknown SAE architecture 'fancy': use one of jumprelu, topk, "
            "standard (SAELens's own)",
            sae_copy(lambda s: edit_json(s / "layer_0" / "cfg.json", lambda d: d.update(architecture="fancy"))), given='layer_0/cfg.json: "architecture": "fancy"'),
        Row("sae-truncated", "truncated safetensors", RUN,
            "{tmp}/saes/layer_2/sae_weights.safetensors is truncated (33584 of 67168 bytes): copy or download it again",
            sae_copy(lambda s: truncate(s / "layer_2" / "sae_weights.safetensors")), given='layer_2/sae_weights.safetensors cut to half its size'),
        Row("sae-cfg-fields", "cfg.json missing fields", RUN,
            "{tmp}/saes/layer_3/cfg.json lacks d_sae: pass a complete SAELens cfg.json (save the SAE again with SAELens)",
            sae_copy(lambda s: edit_json(s / "layer_3" / "cfg.json", lambda d: d.pop("d_sae"))), given='layer_3/cfg.json without d_sae'),
        Row("sae-placeholder", "SAE path without {layer} for several layers", RUN,
            "saes.path '{world}/saes/layer_0' has no {layer} placeholder but 4 layers were asked for: put {layer} where "
            "the layer number goes", lambda c: c.cfg["saes"].update(path=str(c.world / "saes" / "layer_0")), given='saes: {path: /data/saes/layer_0}'),
        Row("sae-layer-demo", "demo SAE for a layer the demo model lacks (it once started the filter stage)", RUN,
            "saes.layers has [99], but refusalscope-demo-smollm2-135m has layers 0..29: fix saes.layers in the config",
            cfg(model={"source": "demo"}, saes={"source": "demo", "layers": [0, 99]})),
        Row("direction-layers", "direction candidate layer the model lacks", RUN,
            "direction.layers has [7], but {model} has layers 0..3: fix direction.layers in the config",
            cfg(direction={"layers": [1, 7]})),
        Row("stage3-layers", "Stage 3 layer without an SAE", RUN,
            "stage3.layers has [5], which have no SAE (SAE layers: 0..3): pick stage3.layers among the SAE layers",
            cfg(stage3={"layers": [1, 5]})),
        Row("sae-release", "unknown SAE release", RUN,
            "unknown SAE release 'no-such-release': pass a release from the SAELens registry "
            "(sae_lens.loading.pretrained_saes_directory) or saes.source: local with a folder",
            cfg(saes={"source": "release", "release": "no-such-release", "sae_id": "layer_{layer}"})),
    ],
    "the judge": [
        Row("judge-classifier", "classifier judge weights missing", RUN,
            "classifier weights not found at {tmp}/cls: download cais/HarmBench-Llama-2-13b-cls and pass its folder, "
            "or use --judge substring",
            lambda c: c.cfg["judge"].update(name="classifier", options={"path": str(c.tmp / "cls")}), given='judge: {name: classifier, options: {path: /data/cls}}'),
    ],
}
