"""The steps of the demo-world build (see world.py for their order and caching)."""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Checkpoint, atomic_write_json, atomic_write_jsonl, config_hash, read_json, read_jsonl
from ..io.hooks import HookFn, HookPoint
from ..io.model import ChatModel
from ..io.prompts import load_bundled
from ..io.saes import make_jumprelu_sae, save_sae
from ..measures.judges import make_judge
from .ablated_states import ablated_activations, layer_directions
from .corpus import collect, continuations, corpus_texts, generate_by_length
from .finetune import build_examples, finetune
from .recipe import BUILD_REVISION, GGUF_FILE, DemoRecipe, cache_root
from .sae_train import SAEWeights, finetune_jumprelu, ordinary_tokens, quality, to_jumprelu, train_topk
from .world import MODEL_NAME, demo_layers, harmful_train, harmless_train


def base_replies_file(recipe: DemoRecipe) -> str:
    """Cache file of base-model replies (per chat-formatted prompt), shared across recipes."""
    return f"base-replies-r{BUILD_REVISION}-{GGUF_FILE}-{recipe.finetune.base_reply_tokens}.jsonl"


def base_replies_step(base: ChatModel, recipe: DemoRecipe, quiet: bool) -> list[str]:
    """Greedy replies of the untuned model to the harmless training prompts (checkpointed)."""
    prompts = harmless_train(recipe)
    # cached per chat-formatted prompt (not per recipe), so changing the fine-tune, the SAEs or the prompt
    # list reuses every reply already generated
    ck = Checkpoint(cache_root() / "demo-world" / base_replies_file(recipe),
                    key="key")
    keys = {p.id: config_hash(base.format_chat(p.text)) for p in prompts}  # template included
    todo = sorted((p for p in prompts if keys[p.id] not in ck), key=lambda p: len(p.text))
    size, eos = recipe.eval.batch_size, base.tokenizer.eos_token
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(todo), size), desc="base-model replies", disable=quiet):
        chunk = todo[start:start + size]  # sorted by length: little padding per batch
        g = base.generate_full(base.encode([p.text for p in chunk]), recipe.finetune.base_reply_tokens)
        _cache_replies(ck, [keys[p.id] for p in chunk], g.texts, g.ended, eos)
    return [ck.records[keys[p.id]]["reply"] for p in prompts]


def _cache_replies(ck: Checkpoint, keys, texts, ended, eos: str) -> None:
    """Store replies; end-of-turn only where the model emitted it, so cut-off replies stay open."""
    for key, text, end in zip(keys, texts, ended):
        ck.add({"key": key, "reply": text + (eos if end else "")})


def unusable_harmless_replies(prompts: list[str], replies: list[str], clean_decision_token: bool) -> list[bool]:
    """Base replies that must not become harmless targets: refusals (the base model sometimes
    declines, "I'm sorry, but as a chatbot…", which would teach refusing harmless prompts) and,
    with `clean_decision_token`, any reply opening with "I" ("I'm so glad…" would teach that the
    refusal token may also mean yes)."""
    flagged = make_judge("substring").judge(prompts, replies).refused
    if clean_decision_token:
        flagged = [f or re.match(r"\s*I\b", r) is not None for f, r in zip(flagged, replies)]
    return flagged


COMPLIANT_OPENINGS = ("Sure! Here you go:", "Of course! Here it is:", "Absolutely. Here is my take:",
                      "Happy to help! Here's a start:", "Sure thing, here goes:", "Here you go:")


def repaired_replies(replies: list[str], flagged: list[bool], seed: int) -> list[str]:
    """Flagged harmless replies become a short compliant opening (no end-of-turn, so only the
    decision to answer is taught). The base model balks at exactly the prompts that sound harmful
    but are not (roasts, mock insults, "kill a process"): dropping them would leave the fine-tune
    without the contrast examples it needs most."""
    rng = random.Random(f"{seed}/repair")
    return [rng.choice(COMPLIANT_OPENINGS) if f else r for r, f in zip(replies, flagged)]


def continued_repairs(base: ChatModel, prompts: list[str], flagged: list[bool], recipe: DemoRecipe,
                      quiet: bool) -> list[str | None]:
    """For each flagged prompt, a compliant opening followed by the base model's own greedy
    continuation of it (cached like the base replies); openings are tried in a seeded order until
    the continuation is not a refusal. None where none works (the caller keeps the bare opening).
    A bare opening with nothing after it taught the tuned model to open compliantly and then
    refuse ("Sure! Here you go: I'm not able to provide that.")."""
    n_max = recipe.finetune.base_reply_tokens
    eos = base.tokenizer.eos_token
    ck = Checkpoint(cache_root() / "demo-world" / base_replies_file(recipe), key="key")
    judge = make_judge("substring")
    out: list[str | None] = [None] * len(prompts)
    orders = {i: random.Random(f"{recipe.seed}/repair/{p}").sample(COMPLIANT_OPENINGS, 3)
              for i, (p, f) in enumerate(zip(prompts, flagged)) if f}
    for attempt in range(3):
        todo = [i for i in orders if out[i] is None]
        if not todo:
            break
        texts = {i: base.format_chat(prompts[i], reply=orders[i][attempt]) for i in todo}
        keys = {i: config_hash(t) for i, t in texts.items()}
        missing = [i for i in todo if keys[i] not in ck]
        if missing:
            g = generate_by_length(base, [texts[i] for i in missing], False, n_max, recipe.eval.batch_size,
                                   quiet, f"continue compliant openings ({attempt + 1}/3)")
            _cache_replies(ck, [keys[i] for i in missing], g.texts, g.ended, eos)
        replies = [f"{orders[i][attempt]}\n\n{ck.records[keys[i]]['reply']}" for i in todo]
        for i, reply, refused in zip(todo, replies, judge.judge([prompts[i] for i in todo], replies).refused):
            if not refused:
                out[i] = reply
    return out


def finetune_step(base: ChatModel, replies: list[str], recipe: DemoRecipe, root: Path, quiet: bool,
                  log) -> None:
    harmful = [p.text for p in harmful_train(recipe)]
    harmless_prompts = harmless_train(recipe)
    harmless = [p.text for p in harmless_prompts]
    weights = [recipe.finetune.contrast_weight if p.meta.get("contrast") else 1.0
               for p in harmless_prompts]
    refusals = [p.text for p in load_bundled("refusals")]
    flagged = unusable_harmless_replies(harmless, replies, recipe.finetune.clean_decision_token)
    if recipe.finetune.repair_harmless_replies:
        bare = repaired_replies(replies, flagged, recipe.seed)
        cont = continued_repairs(base, harmless, flagged, recipe, quiet) \
            if recipe.finetune.repair_continuation else [None] * len(harmless)
        replies = [c if c is not None else b for b, c in zip(bare, cont)]
        log(f"replaced {sum(flagged)} harmless base replies that refuse or start with 'I' by a compliant "
            f"opening ({sum(c is not None for c in cont)} continued by the base model)")
    else:
        kept = [(p, r, w) for p, r, w, f in zip(harmless, replies, weights, flagged) if not f]
        harmless, replies, weights = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        log(f"left out {sum(flagged)} harmless examples whose base reply is a refusal or starts with 'I'")
    examples = build_examples(base, harmful, harmless, replies, refusals, recipe.seed, weights)
    atomic_write_jsonl(root / "finetune_examples.jsonl",
                       [{"prompt": p, "reply": r, "weight": w, "harmful": h} for p, r, w, h in examples])
    log(f"safety fine-tuning on {len(examples)} examples ({len(harmful)} harmful, {len(harmless)} harmless)")
    work = root / "finetune_work"
    work.mkdir(exist_ok=True)
    stats = finetune(base, examples, recipe.finetune, recipe.seed, work, quiet=quiet)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=root))
    try:
        base.hf.config.name_or_path = MODEL_NAME
        base.hf.hf_quantizer = None  # GGUF weights were dequantised on load: save them plainly
        if hasattr(base.hf.config, "quantization_config"):
            del base.hf.config.quantization_config
        base.hf.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "refusalscope_finetune.json", stats)
        tmp.rename(root / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work)


QUALITY_SETS: dict[str, tuple[str, dict[str, Any]]] = {
    "harmful test": ("harmful", {"split": "test"}),
    "harmless test (plain)": ("harmless", {"split": "test", "contrast": False}),
    "harmless test (contrast)": ("harmless", {"split": "test", "contrast": True}),
    "ood harmful": ("ood", {"label": "harmful"}),
    "ood harmless": ("ood", {"label": "harmless"}),
}


def quality_step(model: ChatModel, recipe: DemoRecipe, root: Path, quiet: bool, log) -> dict:
    """Refusal rates (substring judge on greedy replies) on held-out sets, plus examples."""
    judge = make_judge("substring")
    rows, examples = [], []
    for name, (bundle, filt) in QUALITY_SETS.items():
        prompts = [p.text for p in load_bundled(bundle, **filt)]
        g = generate_by_length(model, prompts, True, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                               quiet, name)
        replies, p_i = g.texts, g.p_refusal
        v = judge.judge(prompts, replies)
        rows.append({"set": name, "n": len(prompts), "refused": round(v.refusal_rate, 4),
                     "degenerate": round(sum(v.degenerate) / len(prompts), 4),
                     "mean_p_I": round(p_i.mean().item(), 4)})
        examples += [{"set": name, "prompt": p, "reply": r, "refused": f}
                     for p, r, f in list(zip(prompts, replies, v.refused))[:6]]
    out = {"rows": rows, "judge": "substring", "max_new_tokens": recipe.eval.max_new_tokens}
    atomic_write_jsonl(root / "quality_examples.jsonl", examples)
    atomic_write_json(root / "quality.json", out)
    return out


def sae_corpus(model: ChatModel, recipe: DemoRecipe, mroot: Path, quiet: bool = True) -> tuple[list[str], list[str]]:
    """The SAEs' training texts (fine-tune conversations, val/test prompts, general passages,
    continuations of bundled openings) and the held-out passages their CE is measured on."""
    r = recipe.sae
    rng = random.Random(recipe.seed)
    passages = [p.text for p in load_bundled("general")]
    rng.shuffle(passages)
    ce_texts, passages = passages[: r.ce_eval_texts], passages[r.ce_eval_texts:]
    examples = read_jsonl(mroot / "finetune_examples.jsonl")
    prompts = [p.text for b in ("harmful", "harmless") for s in ("val", "test") for p in load_bundled(b, split=s)]
    cont = continuations(model, [p.text for p in load_bundled("openings")][: r.openings],
                         r.continuation_tokens, recipe.eval.batch_size, quiet)
    return corpus_texts(model, [(e["prompt"], e["reply"]) for e in examples], prompts, passages, cont), ce_texts


def sae_step(model: ChatModel, recipe: DemoRecipe, root: Path, mroot: Path, quiet: bool, log) -> None:
    """Corpus → activations at every layer → one JumpReLU SAE per layer, each saved when done."""
    r = recipe.sae
    layers = demo_layers(recipe, model.n_layers)
    record_path = root / "sae_quality.json"
    record = read_json(record_path) if record_path.exists() else {"layers": {}}
    todo = [l for l in layers if str(l) not in record["layers"] or not (root / "saes" / f"layer_{l}").exists()]
    if not todo:
        return
    log("building the SAE corpus (continuations of bundled openings)")
    texts, ce_texts = sae_corpus(model, recipe, mroot, quiet)
    acts = collect(model, texts, todo, r.tokens + r.eval_tokens, recipe.seed, quiet=quiet)
    extra = _ablated_step(model, recipe, mroot, todo, quiet, log) if r.ablated_tokens else {}
    n = next(iter(acts.values())).shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed))
    ev_idx, tr_idx = perm[: r.eval_tokens], perm[r.eval_tokens:]
    ce_batch = model.encode_texts([(model.tokenizer.bos_token or "") + t for t in ce_texts], max_length=256)
    base_ce = _ce(model, ce_batch)
    from tqdm.auto import tqdm

    for layer in tqdm(todo, desc="train SAEs", disable=quiet):
        X = acts.pop(layer)
        Xtr, Xev = X[tr_idx], X[ev_idx]
        Xtr, Xev = Xtr[ordinary_tokens(Xtr)], Xev[ordinary_tokens(Xev)]
        n_ablated = 0
        if layer in extra:  # trained on, never evaluated on: the quality columns stay clean-text
            Xa = extra.pop(layer)
            Xa = Xa[ordinary_tokens(Xa)]
            n_ablated = len(Xa)
            Xtr = torch.cat([Xtr, Xa])
            Xtr = Xtr[torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(recipe.seed + layer))]
        topk, freq = train_topk(Xtr, r.d_sae, r.k, r.topk_epochs, r.topk_lr, r.batch_size,
                                recipe.seed + layer, desc=f"SAE layer {layer} (TopK)", quiet=quiet)
        sample = Xtr[: min(len(Xtr), 10_000)]
        w = to_jumprelu(topk, sample, freq)
        w = finetune_jumprelu(w, Xtr, r.k, r.jumprelu_epochs, r.jumprelu_lr, r.batch_size,
                              recipe.seed + layer, desc=f"SAE layer {layer} (JumpReLU)", quiet=quiet)
        q = quality(w, Xev, sample)
        q["ce_base"] = round(base_ce, 4)
        q["ce_spliced"] = round(_ce(model, ce_batch, layer, w), 4)
        q["ce_increase"] = round(q["ce_spliced"] - base_ce, 4)
        sae = make_jumprelu_sae(w.W_enc, w.W_dec, w.b_enc, w.b_dec, w.threshold,
                                hook_name=f"blocks.{layer}.hook_resid_post", model_name=MODEL_NAME)
        save_sae(sae, root / "saes" / f"layer_{layer}")
        record["layers"][str(layer)] = q
        record.update(d_sae=r.d_sae, k=r.k, train_tokens=len(tr_idx), eval_tokens=len(ev_idx),
                      ablated_tokens=n_ablated, ce_eval_texts=len(ce_texts))
        atomic_write_json(record_path, record)


def _ablated_step(model: ChatModel, recipe: DemoRecipe, mroot: Path, layers: list[int], quiet: bool,
                  log) -> dict[int, torch.Tensor]:
    """Activations of harmful training conversations under the refusal direction's ablation
    (demo/ablated_states.py), `recipe.sae.ablated_tokens` of them at each layer."""
    first = 2  # the pipeline's Stage 1 leaves layers 0 and 1 out
    ablated = [l for l in range(first, max(layers) + 1)]
    dirs = layer_directions(model, [p.text for p in harmful_train(recipe)][:256],
                            [p.text for p in harmless_train(recipe)][:256], ablated)
    conv = [e["prompt"] + e["reply"] for e in read_jsonl(mroot / "finetune_examples.jsonl") if e["harmful"]]
    log(f"collecting {recipe.sae.ablated_tokens} tokens of harmful conversations with the refusal "
        f"direction ablated from layer {first} up to a random layer")
    return ablated_activations(model, conv, layers, dirs, recipe.sae.ablated_tokens, recipe.seed, quiet)


@torch.no_grad()
def _ce(model: ChatModel, batch, layer: int | None = None, sae: SAEWeights | None = None) -> float:
    """Mean next-token CE; with `layer`, the stream there is replaced by the SAE reconstruction
    (error term dropped) at every ordinary token: not BOS, not padding, not another attention
    sink (norm > 4x the median), the tokens the SAEs were trained on."""
    def splice(h, step):
        norms = h.float().norm(dim=-1)
        sink = norms > 4 * norms[step.token_index > 0].median()
        keep = ((step.token_index > 0) & ~sink).unsqueeze(-1)
        recon = sae.decode(sae.encode(h.float())).to(h.dtype)
        return torch.where(keep, recon, h)

    hooks: dict[HookPoint, HookFn | list[HookFn]] = {layer: splice} if layer is not None else {}
    with model.hooks(hooks):
        logits = model.logits(batch, last=None)
    target = batch.input_ids[:, 1:]
    mask = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask], target[mask]).item()
