"""How close an abliterated model (`export --to model`) is to the direction-ablation hook it stands
for: refusal rate on the run's held-out harmful prompts (the held-out split when the run holds one
out, else its refused test prompts) under the run's judge, for the plain model, the hook and the
exported folder; and, as heretic reports it, the KL divergence of the first-token distribution on
harmless prompts, KL(original ‖ edited) averaged over prompts, for the hook and the folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import torch

from ..interventions.engine import intervene
from ..interventions.spec import DirectionAblation
from ..io.model import ChatModel
from ..methods.evaluate import generate_judged
from ..run.pipeline import Context
from ..run.resolve import load_model, load_prompt_set, take
from ..run.results import RunResults


def first_token_kl(base: torch.Tensor, edited: torch.Tensor) -> float:
    """heretic's number: F.kl_div(edited log-probs, base log-probs, log_target, batchmean)."""
    lp, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(edited.double(), -1)
    return float(torch.nn.functional.kl_div(lq, lp, reduction="batchmean", log_target=True))


def measure(run_dir: str | os.PathLike, model_dir: str | os.PathLike, n_harmful: int | None = None,
            n_harmless: int = 64, quiet: bool = True) -> dict:
    """Refusal rates (plain, hook, abliterated) and first-token KLs (hook, abliterated) as a dict."""
    res = RunResults(run_dir)
    cfg = res.config()
    assert cfg is not None, "the run has no config.yaml"
    ctx = Context(cfg, res.store, quiet=quiet, log=lambda _: None)  # for the run's judge only: never writes
    orig = load_model(cfg, quiet=True, log=lambda _: None)
    from transformers import AutoModelForCausalLM

    ab_hf = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=orig.dtype)
    cast(torch.nn.Module, ab_hf).to(orig.device)  # transformers wraps `to`; its stub misses the bound self
    abl = ChatModel(ab_hf, orig.tokenizer, name="abliterated", system_prompt=orig.system_prompt,
                    refusal_tokens=cfg.model.refusal_tokens)
    direction, layer = res.direction()
    held = res.heldout_prompts()
    split = "heldout" if held else "search (refused test prompts)"
    harmful = [p.text for p in (held or res.kept_prompts())][:n_harmful]
    harmless = take([p.text for p in load_prompt_set(cfg.data.harmless_test, cfg.data.text_field)], n_harmless,
                    cfg.seed)
    gen, judge = cfg.generation, ctx.judge
    hook = [DirectionAblation(direction)]

    def rate(model: ChatModel, shared=()) -> float:
        j = generate_judged(model, None, harmful, None, judge, gen.max_new_tokens, gen.batch_size,
                            shared=shared, quiet=quiet)
        return round(sum(j.refused) / max(1, len(j)), 4)

    batch = orig.encode(harmless)
    base = orig.logits(batch, batch_size=gen.batch_size)[:, -1]
    with intervene(orig, None, shared=hook):
        hooked = orig.logits(batch, batch_size=gen.batch_size)[:, -1]
    edited = abl.logits(batch, batch_size=gen.batch_size)[:, -1]
    out = {"layer": layer, "harmful_split": split, "n_harmful": len(harmful), "n_harmless": len(harmless),
           "judge": judge.name, "refusal_plain": rate(orig), "refusal_hook": rate(orig, hook),
           "refusal_abliterated": rate(abl), "kl_hook": round(first_token_kl(base, hooked), 5),
           "kl_abliterated": round(first_token_kl(base, edited), 5),
           "kl_abliterated_vs_hook": round(first_token_kl(hooked, edited), 5)}
    out["refusal_gap_points"] = round(100 * abs(out["refusal_abliterated"] - out["refusal_hook"]), 1)
    return out
