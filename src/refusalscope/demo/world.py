"""Build, locate and load the embedded demo world (safety-tuned SmolLM2-135M-Instruct + SAEs).

The build runs in steps, each leaving its result in the cache folder before the next starts, so
an interrupted build resumes where it stopped: base replies → fine-tune (per-epoch checkpoints)
→ saved model → quality table → activations → one SAE per layer (each saved as it finishes).
The tuned model lives under `models/<model hash>` and is shared by every recipe that differs
only in its SAE settings; base-model replies are cached per prompt.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..artifacts import atomic_write_json, read_json
from ..errors import UserError
from ..io.model import ChatModel, load_chat_model
from ..io.prompts import load_bundled
from .recipe import DemoRecipe, base_gguf_path, cache_root, model_hash, recipe_hash

MODEL_NAME = "refusalscope-demo-smollm2-135m"


def world_dir(recipe: DemoRecipe | None = None) -> Path:
    recipe = recipe or DemoRecipe()
    return cache_root() / "demo-world" / recipe_hash(recipe)


def model_dir(recipe: DemoRecipe | None = None) -> Path:
    """Folder of the tuned model (`model/`), its training examples and its quality table."""
    return cache_root() / "demo-world" / "models" / model_hash(recipe or DemoRecipe())


def world_info(recipe: DemoRecipe | None = None) -> dict:
    """The build record (`world.json`) of the demo world for this recipe, or {} if never built."""
    path = world_dir(recipe) / "world.json"
    return read_json(path) if path.exists() else {}


def is_built(recipe: DemoRecipe | None = None) -> bool:
    return world_info(recipe).get("status") == "complete"


def sae_dir(layer: int, recipe: DemoRecipe | None = None) -> Path:
    return world_dir(recipe) / "saes" / f"layer_{layer}"


def load_demo_model(recipe: DemoRecipe | None = None, **kwargs) -> ChatModel:
    """The safety-tuned demo model; builds the world first if it is missing."""
    path = model_dir(recipe) / "model"
    if not (path / "config.json").exists():
        raise UserError(f"demo world not built at {world_dir(recipe)}: run `refusalscope demo-world build`")
    kwargs.setdefault("name", MODEL_NAME)
    kwargs.setdefault("dtype", "float32")
    return load_chat_model(path, **kwargs)


DEMO_N_LAYERS = 30  # SmolLM2-135M's depth: layer lists are checked before the world is built


def demo_layers(recipe: DemoRecipe | None = None, n_layers: int = DEMO_N_LAYERS) -> list[int]:
    recipe = recipe or DemoRecipe()
    layers = recipe.sae.layers
    if layers == "all":
        return list(range(n_layers))
    assert not isinstance(layers, str), f"SAE layers {layers!r}: a list of layers or 'all'"
    return list(layers)


def _set_threads() -> None:
    import os

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))


def build_world(recipe: DemoRecipe | None = None, quiet: bool = False, force: bool = False,
                log=print) -> dict:
    """Build (or finish building) the demo world; returns its build record."""
    from .build_steps import base_replies_step, finetune_step, quality_step, sae_step

    recipe = recipe or DemoRecipe()
    root = world_dir(recipe)
    if force and root.exists():
        shutil.rmtree(root)
    info = world_info(recipe)
    if info.get("status") == "complete":
        return info
    root.mkdir(parents=True, exist_ok=True)
    _set_threads()
    mroot = model_dir(recipe)
    mroot.mkdir(parents=True, exist_ok=True)
    info = {"status": "building", "hash": recipe_hash(recipe), "recipe": recipe.model_dump(),
            "timings": info.get("timings", {}), "path": str(root), "model_path": str(mroot)}
    t_all = time.perf_counter()

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        info["timings"][name] = round(info["timings"].get(name, 0) + time.perf_counter() - t0, 1)
        atomic_write_json(root / "world.json", info)
        return out

    if not (mroot / "model" / "config.json").exists():
        log("loading the base model (SmolLM2-135M-Instruct, GGUF, dequantised to fp32)")
        base = timed("load_base", lambda: load_chat_model(base_gguf_path(), dtype="float32",
                                                          device="cpu", name="smollm2-base"))
        if not recipe.finetune.default_system_prompt:
            base.tokenizer.chat_template = without_default_system(base.tokenizer.chat_template)
        replies = timed("base_replies", base_replies_step, base, recipe, quiet)
        timed("finetune", finetune_step, base, replies, recipe, mroot, quiet, log)
        del base
    else:
        log(f"reusing the tuned model at {mroot}")
    model = timed("load_tuned", load_demo_model, recipe)
    if not (mroot / "quality.json").exists():
        timed("quality", quality_step, model, recipe, mroot, quiet, log)
    timed("saes", sae_step, model, recipe, root, mroot, quiet, log)
    info["status"] = "complete"
    info["build_seconds"] = round(sum(info["timings"].values()), 1)
    info["this_session_seconds"] = round(time.perf_counter() - t_all, 1)
    info["quality"] = read_json(mroot / "quality.json")
    info["sae_quality"] = read_json(root / "sae_quality.json")
    atomic_write_json(root / "world.json", info)
    return info


def without_default_system(template: str) -> str:
    """SmolLM2's template inserts a 20-token default system prompt before every chat; the demo
    drops it (the tuned model's saved template has none), which cuts about a third of the
    tokens every build and pipeline pass processes. A system prompt a user passes still shows."""
    if _DEFAULT_SYSTEM not in template:
        raise UserError("the base model's chat template changed: set finetune.default_system_prompt")
    return template.replace(_DEFAULT_SYSTEM, "")


_DEFAULT_SYSTEM = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                   "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                   "{% endif %}")


def harmless_train(recipe: DemoRecipe):
    splits = ["train", "val"] if recipe.finetune.include_val else ["train"]
    return [p for s in splits for p in load_bundled("harmless", split=s)]


def harmful_train(recipe: DemoRecipe):
    splits = ["train", "val"] if recipe.finetune.include_val else ["train"]
    return [p for s in splits for p in load_bundled("harmful", split=s)]

