"""A planted refusal world at the paper's real shapes, saved the way the real presets load it.

A random-weight Gemma-2-2B (or Llama-3.1-8B; `--small`: tiny dimensions for a CPU) in which a
planted mechanism makes harmful prompts open with "I", Gemma Scope-shaped (params.npz) or Llama
Scope-shaped (checkpoints/final.safetensors) JumpReLU SAEs at every layer with planted refusal
latents, harmful/harmless prompt files, and `config.yaml`: the gemma-2-2b-it / llama-3.1-8b-it
preset pointed at all of it. It is tests/planted.py at real size:
1. tokens found only in harmful prompts get a shared extra embedding direction;
2. per layer l the difference of mean last-token residuals (harmful − harmless) gives r̂_l and a
   midpoint m_l;
3. the unembedding row of "I" reads that difference on the final normed stream, scaled from the
   measured log-sum-exp of the other logits so P(I) is high on harmful prompts and ~0 on harmless;
4. each SAE gets `n_planted` latents along r̂_l (a little noise each, so Stage 1 has an order to
   find) that fire where (h − m_l)·r̂_l > 0 and together rebuild that component: ablating them moves
   the stream to the midpoint, P(I) collapses and refused prompts flip;
5. the other latents are random unit directions orthogonal to the mean residual and to the mean
   of each template position, with one threshold per layer set on sampled residuals for L0 ≈ 64
   (Llama Scope stores one scalar threshold).
`world.json` records P(I) with and without the planted latents ablated: the flip is measured.

`--wide`: the paper's SAE width on a model this CPU runs (issue 19): a random-weight
Gemma2ForCausalLM at hidden size 256 with 20 layers and 65,536-wide SAEs on every layer (`--d-sae
16384` for the same world at 16k: same model, prompts and planted latents, same seed);
`--wide --small` keeps the same path CI-sized (hidden 64, 20 layers, 2,048 latents; a weaker harm
signal whose refusal sits deep enough that l* clears the preset's exclude_layers: see DEEP).

    python benchmarks/planted_world.py OUT [--arch gemma-2-2b] [--small] [--wide] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny tokenizer + templates
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_shapes

from bench_shapes import random_hf_model  # noqa: E402

from refusalscope.interventions.spec import FeatureAblation  # noqa: E402
from refusalscope.io.model import ChatModel  # noqa: E402
from refusalscope.io.prompts import load_bundled  # noqa: E402
from refusalscope.io.saes import FeatureDictionary, SAESet  # noqa: E402
from refusalscope.methods.evaluate import refusal_probs  # noqa: E402

SCOPE = {"gemma-2-2b": ("gemma_scope", 16384, "gemma-2-2b-it"),
         "llama-3.1-8b": ("llama_scope", 32768, "llama-3.1-8b-it")}
WIDE = {False: dict(hidden=256, mlp=1024, layers=20, heads=4, kv=2, head_dim=64, vocab=8192, d_sae=65536),
        True: dict(hidden=64, mlp=128, layers=20, heads=4, kv=2, head_dim=16, vocab=2048, d_sae=2048)}
# the CI-sized wide world (hidden 64): at the embedding strength of the others (12) the harm signal
# dominates every layer's stream, so r̂ at layer 1 ablates as well as any deeper one and l* lands below
# the gemma-2-2b-it preset's exclude_layers [0, 1]. A weaker signal (2) that the layers transform, and
# a readout blind to what layers 0-1 already carry, put the refusal deep: ablating r̂_1 leaves
# P(I) ~1e-5, r̂_12 ~1e-11, and l* = 12 (tests/test_wide_world.py checks l* >= 2)
DEEP = (2.0, 2)
L0 = 64  # active random latents per token (Gemma Scope's canonical SAEs: ~70)
SPLITS = ("train", "val", "test")


def write_prompts(root: Path) -> dict[str, str]:
    """The bundled harmful/harmless sets as JSONL files, one per split plus one of all rows."""
    out = {}
    for name in ("harmful", "harmless"):
        rows = load_bundled(name)
        for split in SPLITS + ("all",):
            part = [p for p in rows if split == "all" or p.split == split]
            path = root / "prompts" / f"{name}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"instruction": p.text, "category": p.category}) + "\n"
                                    for p in part))
            out[f"{name}_{split}"] = str(path)
    return out


def make_tokenizer(arch: str, small: bool, vocab: int | None = None):
    from tiny import tiny_tokenizer

    texts = [p.text for n in ("harmful", "harmless", "refusals", "general") for p in load_bundled(n)]
    return tiny_tokenizer("gemma" if arch.startswith("gemma") else "chatml", corpus=texts,
                          vocab_size=vocab or (2048 if small else 8192))


def token_scores(tok, harmful: list[str], harmless: list[str]) -> torch.Tensor:
    """Per token id, a harm score in [-1, 1]: the log ratio of the shares of harmful and harmless
    prompts it occurs in (naive Bayes), clipped at 2 nats. Subword tokens are shared by both sets
    (the bundled harmless prompts copy harmful phrasings), so no token is harmful alone."""
    df = {}
    for c, ps in (("h", harmful), ("s", harmless)):
        cnt = torch.zeros(len(tok))
        for p in ps:
            cnt[list(set(tok(p, add_special_tokens=False)["input_ids"]))] += 1
        df[c] = (cnt + 1) / (len(ps) + 2)
    return (df["h"].log() - df["s"].log()).clamp(-2, 2) / 2


@torch.no_grad()
def residual_stats(model: ChatModel, harmful: list[str], harmless: list[str], batch_size: int) -> dict:
    """Per layer: mean last-token residual of each class, and the residuals of every token of the
    first batch of each class (a sample to place the random latents and their thresholds); per
    prompt, the final normed last-token stream the unembedding reads."""
    n, dev, norm = model.n_layers, model.device, model.hf.model.norm
    last = {c: torch.zeros(n, model.d_model, device=dev) for c in ("harmful", "harmless")}
    fin = {c: [] for c in ("harmful", "harmless")}
    tokens, tails = {l: [] for l in range(n)}, {l: [] for l in range(n)}
    state = {"cls": "harmful", "first": True}

    def hook(layer):
        def fn(h, step):
            x = h.float()
            last[state["cls"]][layer] += x[:, -1].sum(0)
            if state["first"]:
                tokens[layer].append(x[~step.is_pad])
                tails[layer].append(x[:, -4:])  # left padding: the last 4 are template tokens
            if layer == n - 1:  # what the unembedding reads: the final normed stream
                fin[state["cls"]].append(norm(h[:, -1]).float())
                state["first"] = False
        return fn

    with model.hooks({l: hook(l) for l in range(n)}):
        for c, prompts in (("harmful", harmful), ("harmless", harmless)):
            state.update(cls=c, first=True)
            model.logits(model.encode(prompts), batch_size=batch_size)
    return {"harmful": last["harmful"] / len(harmful), "harmless": last["harmless"] / len(harmless),
            "final_harmful": torch.cat(fin["harmful"]), "final_harmless": torch.cat(fin["harmless"]),
            "tokens": {l: torch.cat(v) for l, v in tokens.items()},
            "tails": {l: torch.cat(v) for l, v in tails.items()}}


@torch.no_grad()
def plant_readout(model: ChatModel, stats: dict, harmful: list[str], batch_size: int, deep_from: int = 0) -> dict:
    """Point the "I" unembedding row at the final harmful − harmless difference ŵ (less its part along
    the mean differences of layers < `deep_from`: the readout reads what deeper layers add), plus a bias-like
    term along the mean stream, fitted so the median harmful train prompt gets a logit 2 nats above
    the log-sum-exp of the other tokens and the median harmless one as far below (medians, not
    means: a few prompts with a strong signal would otherwise set the scale for all)."""
    hf, i_tok = model.hf, model.refusal_token_ids[0]
    Xh, Xs = stats["final_harmful"], stats["final_harmless"]
    d, mid = Xh.mean(0) - Xs.mean(0), (Xh.mean(0) + Xs.mean(0)) / 2
    w = d - (d @ mid) / (mid @ mid) * mid
    if deep_from:  # what layers < deep_from carry is left out of what the readout reads
        early = [stats["harmful"][l] - stats["harmless"][l] for l in range(deep_from)]
        Q = torch.linalg.qr(torch.stack([mid, *early]).T.to(d)).Q
        w = d - Q @ (Q.T @ d)
    w, v = w / w.norm(), mid / (mid @ mid)  # x·v ≈ 1 for every prompt: acts as a bias
    logits = model.logits(model.encode(harmful[:64]), batch_size=batch_size)[:, -1].to(d.device)
    logits[:, i_tok] = -float("inf")
    target = float(torch.logsumexp(logits, -1).mean()) + 2.0
    cap = getattr(hf.config, "final_logit_softcapping", None)
    z = cap * math.atanh(min(target / cap, 0.95)) if cap else target
    A = torch.tensor([[(Xh @ w).median(), (Xh @ v).median()], [(Xs @ w).median(), (Xs @ v).median()]])
    a, b = torch.linalg.solve(A.double(), torch.tensor([z, -z], dtype=torch.float64)).tolist()
    hf.lm_head.weight[i_tok] = (a * w + b * v).to(hf.lm_head.weight.dtype)
    return {"lse_others": target - 2.0, "pre_cap_logit": z, "a": a, "b": b}


def make_sae(stats: dict, layer: int, d_sae: int, n_planted: int, seed: int) -> dict:
    """One layer's JumpReLU SAE tensors (fp32, on the stats' device) with planted latents."""
    diff = stats["harmful"][layer] - stats["harmless"][layer]
    mid = (stats["harmful"][layer] + stats["harmless"][layer]) / 2
    r_hat, dn = diff / diff.norm(), float(diff.norm())
    dev, d = diff.device, diff.shape[0]
    g = torch.Generator(device=dev).manual_seed(seed * 1000 + layer)
    # random latents: unit directions orthogonal to the mean residual and to the mean of each
    # template position (the tokens every prompt ends with, which Stage 3 reads), so no latent
    # fires on every token the way a constant offset would make it
    tok, tail = stats["tokens"][layer], stats["tails"][layer]
    Q = torch.linalg.qr(torch.cat([tok.mean(0, keepdim=True), tail.mean(0)]).T).Q  # [d, 5]
    W_dec = torch.randn(d_sae, d, generator=g, device=dev)
    W_dec -= (W_dec @ Q) @ Q.T
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous()
    b_enc = torch.zeros(d_sae, device=dev)
    pre = tok[torch.randperm(len(tok), generator=torch.Generator().manual_seed(layer))[:512]] @ W_enc
    target = min(L0, d_sae // 8)  # tiny SAEs: an eighth of the latents
    theta = float(pre.flatten().kthvalue(int(pre.numel() * (1 - target / d_sae))).values)
    ids = torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed * 1000 + layer))[:n_planted]
    s = 4 * theta * 2 * n_planted / dn  # a mean harmful last token pre-activates at 4θ
    gp = torch.Generator(device=dev).manual_seed(seed * 1000 + layer + 500)  # same noise at every width
    for j, i in enumerate(ids.tolist()):
        v = r_hat + 0.4 * (j + 1) / n_planted * torch.randn(d, generator=gp, device=dev) / d ** 0.5
        v /= v.norm()
        W_enc[:, i] = s * r_hat / (n_planted * float(r_hat @ v))
        W_dec[i] = v / s
        b_enc[i] = -s * float(mid @ r_hat) / (n_planted * float(r_hat @ v))
    th = torch.full((d_sae,), theta, device=dev)
    l0 = {k: float(((x @ W_enc + b_enc) > th).sum(-1).float().mean()) for k, x in (("all", tok), ("last", tail[:, -1]))}
    return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": torch.zeros(d, device=dev),
            "threshold": th, "planted": ids.tolist(), "theta": theta, "l0": l0}


def save_sae(t: dict, layer: int, root: Path, fmt: str) -> None:
    """Write one SAE where the real layouts put it (see `sae_path`)."""
    folder = Path(sae_path(root, fmt, t["W_enc"].shape[1]).format(layer=layer))
    folder.mkdir(parents=True, exist_ok=True)
    arr = {k: t[k].float().cpu().numpy() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    if fmt == "gemma_scope":
        np.savez(folder / "params.npz", **arr)
        return
    from safetensors.numpy import save_file

    (folder / "checkpoints").mkdir(exist_ok=True)
    save_file({"encoder.weight": np.ascontiguousarray(arr["W_enc"].T), "decoder.weight":
               np.ascontiguousarray(arr["W_dec"].T), "encoder.bias": arr["b_enc"], "decoder.bias": arr["b_dec"]},
              str(folder / "checkpoints" / "final.safetensors"))
    d, m = arr["W_enc"].shape
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d, "d_sae": m, "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post", "jump_relu_threshold": t["theta"],
        "dataset_average_activation_norm": {"in": d ** 0.5, "out": d ** 0.5}}))  # norm factor 1


def sae_path(root: Path, fmt: str, d_sae: int = 16384) -> str:
    if fmt == "gemma_scope":
        width = f"width_{d_sae // 1024}k" if d_sae >= 1024 else f"width_{d_sae}"
        return str(root / "saes" / "gemma-scope-2b-pt-res" / "layer_{layer}" / width / f"average_l0_{L0}")
    return str(root / "saes" / "llama_scope_lxr_8x" / "l{layer}r_8x")


def planted_only(t: dict, dtype: torch.dtype) -> dict:
    """The planted latents of one SAE: ablating all of them is the same sparse edit as in the
    full SAE (the error term keeps the rest), at a fraction of the memory."""
    i = torch.tensor(t["planted"], device=t["W_enc"].device)
    return {"W_enc": t["W_enc"][:, i].to(dtype), "W_dec": t["W_dec"][i].to(dtype), "b_enc": t["b_enc"][i].to(dtype),
            "b_dec": t["b_dec"].to(dtype), "threshold": t["threshold"][i].to(dtype)}


def planted_dictionaries(saes: dict[int, dict]) -> SAESet:
    return SAESet({l: FeatureDictionary(l, f"blocks.{l}.hook_resid_post", "jumprelu", t["W_enc"], t["W_dec"],
                                        t["b_enc"], t["b_dec"], t["threshold"]) for l, t in saes.items()})


def flip_check(model: ChatModel, planted: SAESet, prompts: dict[str, list[str]], batch_size: int,
               first_layer: int = 2) -> dict:
    """P(I) on the test sets, and on harmful prompts with the planted latents ablated at every
    layer from `first_layer` (Stage 1's default range): the threshold and share that flip."""
    p_h = refusal_probs(model, None, prompts["harmful_test"], batch_size=batch_size)
    p_s = refusal_probs(model, None, prompts["harmless_test"], batch_size=batch_size)
    abl = FeatureAblation({l: list(range(planted[l].d_sae)) for l in planted.keys() if l >= first_layer})
    p_a = refusal_probs(model, planted, prompts["harmful_test"], batch_size=batch_size, shared=[abl])
    # the judge's threshold: the one that best separates "refused, and flips when ablated" from
    # "harmless but refused" (a random model's P(I) scale is arbitrary, so it is fitted, not set)
    cands = torch.cat([p_h, p_s, p_a]).clamp(1e-30, 0.99).unique()
    gain = torch.stack([((p_h >= t) & (p_a < t)).float().mean() - (p_s >= t).float().mean() for t in cands])
    thr = float(cands[gain.argmax()])
    refused = p_h >= thr
    return {"threshold": thr, "p_harmful_median": float(p_h.median()), "p_harmless_median": float(p_s.median()),
            "p_ablated_median": float(p_a.median()), "harmful_refused": float(refused.float().mean()),
            "harmless_refused": float((p_s >= thr).float().mean()),
            "flipped_of_refused": float((refused & (p_a < thr)).sum() / refused.sum().clamp_min(1))}


def world_config(root: Path, arch: str, files: dict, device: str, dtype: str, threshold: float,
                 d_sae: int = 16384) -> dict:
    fmt, _, preset = SCOPE[arch]
    return {"preset": preset, "name": f"planted-{arch}",
            "model": {"source": str(root / "model"), "dtype": dtype, "device": device},
            "saes": {"source": "local", "path": sae_path(root, fmt, d_sae), "layers": "all", "neuronpedia_id": None},
            "data": {k: v for k, v in files.items() if not k.endswith("_all")},
            "judge": {"name": "first-token", "options": {"threshold": threshold},
                      "degenerate_is_jailbreak": True},  # a random model's replies are word salad
            "stage3": {"harmful": [files["harmful_all"]], "harmless": [files["harmless_all"]]},
            # every text the presets read from the hub comes from the world's own files (no network)
            "analyses": {"taxonomy_prompts": [files["harmful_all"]], "ce_instructions": files["harmless_test"],
                         "ce_general": files["harmless_test"], "taxonomy_field": "category", "taxonomy_only": None},
            "dashboards": {"corpus": [files["harmless_test"]]},
            "eval": {"general_text": files["harmless_test"]}}


def build_world(root: str | Path, arch: str = "gemma-2-2b", small: bool = False, d_sae: int | None = None,
                n_planted: int = 16, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                batch_size: int = 32, n_stats: int | None = None, n_check: int | None = None,
                alpha: float | None = None, wide: bool = False, deep_from: int | None = None, log=print) -> dict:
    root, t0 = Path(root), time.perf_counter()
    if alpha is None or deep_from is None:  # see DEEP: the CI-sized wide world's refusal sits deep
        a, dfrom = DEEP if wide and small else (12.0, 0)
        alpha, deep_from = alpha if alpha is not None else a, deep_from if deep_from is not None else dfrom
    fmt, full_d_sae, _ = SCOPE[arch]
    shape = WIDE[small] if wide else None
    if wide and not arch.startswith("gemma"):
        raise SystemExit("--wide builds a Gemma-2 world: drop --arch or pass --arch gemma-2-2b")
    d_sae = d_sae or (shape["d_sae"] if shape else 256 if small else full_d_sae)
    files = write_prompts(root)
    prompts = {k: [json.loads(l)["instruction"] for l in Path(v).read_text().splitlines()] for k, v in files.items()}
    tok = make_tokenizer(arch, small, shape["vocab"] if shape else None)
    model = ChatModel(random_hf_model(arch, small, tok, torch.float32, device, seed, shape), tok, name=arch)
    hf = model.hf
    with torch.no_grad():  # 1: tokens get an embedding direction in proportion to their harm score
        score = token_scores(tok, prompts["harmful_train"], prompts["harmless_train"]).to(device)
        emb = hf.model.embed_tokens.weight
        u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(seed)).to(emb.device)
        emb[: len(score)] += alpha * emb.norm(dim=1).median() * score[:, None] * (u / u.norm())
        hf.config.tie_word_embeddings = False
        hf.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    train = {c: prompts[f"{c}_train"][:n_stats] for c in ("harmful", "harmless")}  # None: all
    stats = residual_stats(model, train["harmful"], train["harmless"], batch_size)  # 2
    readout = plant_readout(model, stats, prompts["harmful_train"], batch_size, deep_from)  # 3
    log(f"planted world: model planted ({int((score > 0.5).sum())} harm-marked tokens) "
        f"in {time.perf_counter() - t0:.0f} s")
    saes, l0, planted_ids = {}, {"all": [], "last": []}, {}
    for layer in range(model.n_layers):  # 4, 5
        t = make_sae(stats, layer, d_sae, n_planted, seed)
        save_sae(t, layer, root, fmt)
        for k in l0:
            l0[k].append(t["l0"][k])
        saes[layer] = planted_only(t, getattr(torch, dtype))
        planted_ids[layer] = t["planted"]
        del t
    log(f"planted world: {model.n_layers} SAEs x {d_sae} latents saved in {time.perf_counter() - t0:.0f} s")
    hf.to(getattr(torch, dtype))
    test = {k: prompts[k][:n_check] for k in ("harmful_test", "harmless_test")}
    check = flip_check(model, planted_dictionaries(saes), test, batch_size)
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    cfg = world_config(root, arch, files, device, dtype, check["threshold"], d_sae)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    info = {"arch": arch, "small": small, "wide": wide, "d_sae": d_sae, "d_model": model.d_model,
            "layers": model.n_layers, "n_planted": n_planted,
            "format": fmt, "dtype": dtype, "device": device, "harm_marked_tokens": int((score > 0.5).sum()),
            "readout": readout, "check": check, "planted": {str(l): v for l, v in planted_ids.items()},
            "l0_mean": {k: round(sum(v) / len(v), 1) for k, v in l0.items()},  # per token, at the last token
            "config": str(root / "config.yaml"),
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (root / "world.json").write_text(json.dumps(info, indent=1))
    log(f"planted world: {json.dumps(check)}")
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", choices=sorted(SCOPE), default="gemma-2-2b")
    ap.add_argument("--small", action="store_true", help="tiny dimensions (CPU)")
    ap.add_argument("--wide", action="store_true", help="hidden 256, 20 layers, 65k SAEs (with --small: CI size)")
    ap.add_argument("--d-sae", type=int, default=None, help="latents per SAE (default: 16k / 32k, 256 small)")
    ap.add_argument("--n-planted", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-stats", type=int, default=None, help="train prompts per class for the means (all)")
    ap.add_argument("--n-check", type=int, default=None, help="test prompts per class for the flip check")
    a = ap.parse_args(argv)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return build_world(a.out, a.arch, a.small, a.d_sae, a.n_planted, a.device, dtype, a.seed,
                       n_stats=a.n_stats, n_check=a.n_check, wide=a.wide)


if __name__ == "__main__":
    main()
