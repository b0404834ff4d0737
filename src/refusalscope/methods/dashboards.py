"""Feature dashboards (SAEDashboard / Neuronpedia conventions) for the latents a run found, so the
report and the web app only read files: where a latent fires on a corpus (histogram of non-zero
values, top contexts with per-token activations, quantile samples), what it writes (top and bottom
logit effects W_dec[i]·W_U, cosine to r̂), and what no dashboard shows: its FM neighbours and what
ablating it alone does to P("I") on the prompts it is critical for.

Attention-sink positions (BOS, and any token whose residual norm dwarfs the row's median) are
flagged, not hidden: dormant "hydra" latents wake up there. Contexts are ranked by activations
away from sinks, falling back to sink positions for latents that fire nowhere else.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel, PromptBatch
from .activity import Prompts, prefix_lengths, region, sinks, subset_acts
from .latent_weights import decoder_cosines, fm_neighbours, logit_effects  # noqa: F401  (callers import them here)


def sink_flagged(bos_texts: int, sink_share: float) -> bool:
    """A latent that fires on BOS of some text, or mostly on sink positions: where hydra latents live."""
    return bos_texts > 0 or sink_share >= 0.5


@dataclass
class TokenWindow:
    """Tokens around a latent's peak in one corpus text, with its activation on each token.
    `peak` indexes `tokens`; `position` is the peak's token index in the text; `sinks` lists the
    window indices that are attention-sink positions (BOS included)."""

    text: int
    position: int
    peak: int
    value: float
    tokens: list[str]
    acts: list[float]
    sinks: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TokenWindow:
        return cls(int(d["text"]), int(d["position"]), int(d["peak"]), float(d["value"]),
                   list(d["tokens"]), [float(a) for a in d["acts"]], [int(s) for s in d.get("sinks", [])])


@dataclass
class LatentDashboard:
    """Everything the latent page shows that needs the model, computed once per run.

    `density`: share of corpus tokens where the latent is non-zero; `sink_share`: share of its
    firings that sit on sink positions; `bos_texts`: corpus texts where it fires on BOS.
    `effects`: per prompt it is critical for, P("I") plain, with it ablated alone, and (Stage 2
    sets) with the rest of the set ablated with and without it."""

    feature: str
    n_texts: int
    n_tokens: int
    n_nonzero: int
    max_activation: float
    histogram: dict
    top: list[TokenWindow]
    quantiles: list[dict]
    logits_top: list[tuple[str, float]]
    logits_bottom: list[tuple[str, float]]
    cos_direction: float | None
    sink_share: float
    bos_texts: int
    max_at_sink: float
    fm_neighbours: list[tuple[str, float]] = field(default_factory=list)
    effects: list[dict] = field(default_factory=list)
    explanation: str | None = None
    explanation_source: str | None = None  # neuronpedia / activations

    @property
    def density(self) -> float:
        return self.n_nonzero / self.n_tokens if self.n_tokens else 0.0

    @property
    def sink_flag(self) -> bool:
        return sink_flagged(self.bos_texts, self.sink_share)

    def to_json(self) -> dict:
        d = asdict(self)
        d["top"] = [w.to_json() for w in self.top]
        d["quantiles"] = [{**q, "samples": [w.to_json() for w in q["samples"]]} for q in self.quantiles]
        return d

    @classmethod
    def from_json(cls, d: dict) -> LatentDashboard:
        pairs = lambda xs: [(str(a), float(b)) for a, b in xs]  # noqa: E731
        return cls(d["feature"], int(d["n_texts"]), int(d["n_tokens"]), int(d["n_nonzero"]),
                   float(d["max_activation"]), dict(d["histogram"]),
                   [TokenWindow.from_json(w) for w in d["top"]],
                   [{**q, "samples": [TokenWindow.from_json(w) for w in q["samples"]]} for q in d["quantiles"]],
                   pairs(d["logits_top"]), pairs(d["logits_bottom"]), d.get("cos_direction"),
                   float(d["sink_share"]), int(d["bos_texts"]), float(d["max_at_sink"]),
                   pairs(d.get("fm_neighbours", [])), list(d.get("effects", [])), d.get("explanation"),
                   d.get("explanation_source"))


# ----------------------------------------------------------------- corpus pass 1: statistics
COLS = 4096  # latent columns of one layer encoded at once: [b, T, COLS] stays small at any width


@dataclass
class _Stats:
    """One latent's corpus statistics (its tensors are column views of the layer's tables)."""

    best: torch.Tensor  # [n_texts] max away from sinks
    where: torch.Tensor  # [n_texts] its token index
    best_all: torch.Tensor  # [n_texts] max anywhere
    where_all: torch.Tensor
    values: list[torch.Tensor] = field(default_factory=list)  # non-zero activations (capped)
    n_nonzero: int = 0
    n_sink: int = 0
    max_sink: float = 0.0
    bos_texts: int = 0


class ValueSample:
    """Per latent of one layer, a uniform sample of at most `cap` of all its non-zero values
    (bottom-`cap` of seeded random keys), kept as three flat tensors so a histogram over a large
    corpus stays unbiased and small without one Python object per latent."""

    def __init__(self, n: int, cap: int, g: torch.Generator):
        self.n, self.cap, self.g = n, cap, g
        self.col = torch.zeros(0, dtype=torch.long)
        self.key = torch.zeros(0)
        self.val = torch.zeros(0)

    def add(self, col: torch.Tensor, val: torch.Tensor) -> None:
        self.col = torch.cat([self.col, col.long()])
        self.key = torch.cat([self.key, torch.rand(len(col), generator=self.g)])
        self.val = torch.cat([self.val, val.float()])
        if len(self.col) and int(torch.bincount(self.col, minlength=self.n).max()) > self.cap:
            self._prune()

    def _prune(self) -> None:
        by_key = torch.argsort(self.key)
        order = by_key[torch.argsort(self.col[by_key], stable=True)]  # by latent, then key
        col = self.col[order]
        counts = torch.bincount(col, minlength=self.n)
        rank = torch.arange(len(col)) - (counts.cumsum(0) - counts)[col]
        keep = order[rank < self.cap]
        self.col, self.key, self.val = self.col[keep], self.key[keep], self.val[keep]

    def per_latent(self) -> list[torch.Tensor]:
        """The kept values of each latent, in latent order."""
        order = torch.argsort(self.col, stable=True)
        counts = torch.bincount(self.col, minlength=self.n).tolist()
        return list(torch.split(self.val[order], counts))


def sink_mask(
    model: ChatModel, sub: PromptBatch, h: torch.Tensor, ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """([b, T] sink positions, [b, T] BOS positions) of a left-padded chunk, on `h`'s device."""
    valid = sub.attention_mask.bool()
    T = sub.input_ids.shape[1]
    first = (T - sub.lengths).unsqueeze(1)
    at_first = torch.arange(T).unsqueeze(0) == first
    bos_id = model.tokenizer.bos_token_id
    bos = at_first & (sub.input_ids == bos_id) if bos_id is not None else torch.zeros_like(valid)
    valid, bos = valid.to(h.device), bos.to(h.device)
    return (sinks(h, valid, ratio) | bos) & valid, bos & valid


class _LayerTables:
    """One layer's per-(text, latent) maxima and per-latent counts, filled chunk by chunk."""

    def __init__(self, n_texts: int, n: int, cap: int, g: torch.Generator):
        self.best, self.best_all = torch.zeros(n_texts, n), torch.zeros(n_texts, n)
        self.where = torch.zeros(n_texts, n, dtype=torch.long)
        self.where_all = torch.zeros(n_texts, n, dtype=torch.long)
        self.n_on, self.n_sink = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        self.n_bos, self.max_sink = torch.zeros(n, dtype=torch.long), torch.zeros(n)
        self.sample = ValueSample(n, cap, g)

    def update(self, rows: slice, cols: slice, acts: torch.Tensor, sink: torch.Tensor, bos: torch.Tensor,
               pad: torch.Tensor) -> None:
        """Fold in acts [b, T, c] (on any device) of latents `cols` for corpus rows `rows`."""
        away = acts.masked_fill(sink.unsqueeze(-1), 0.0)
        v, c = away.max(dim=1)
        self.best[rows, cols], self.where[rows, cols] = v.cpu(), c.cpu() - pad
        v, c = acts.max(dim=1)
        self.best_all[rows, cols], self.where_all[rows, cols] = v.cpu(), c.cpu() - pad
        on = acts > 0
        self.n_on[cols] += on.sum(dim=(0, 1)).cpu()
        self.n_sink[cols] += (on & sink.unsqueeze(-1)).sum(dim=(0, 1)).cpu()
        self.max_sink[cols] = torch.maximum(self.max_sink[cols], (acts * sink.unsqueeze(-1)).amax(dim=(0, 1)).cpu())
        self.n_bos[cols] += (on & bos.unsqueeze(-1)).any(dim=1).sum(dim=0).cpu()
        nz = on.nonzero()
        self.sample.add(nz[:, 2].cpu() + cols.start, acts[on].cpu())

    def stats(self) -> list[_Stats]:
        values = self.sample.per_latent()
        return [_Stats(self.best[:, j], self.where[:, j], self.best_all[:, j], self.where_all[:, j],
                       [values[j]] if len(values[j]) else [], int(self.n_on[j]), int(self.n_sink[j]),
                       float(self.max_sink[j]), int(self.n_bos[j])) for j in range(self.best.shape[1])]


def corpus_stats(model: ChatModel, saes, batch: PromptBatch, by_layer: dict[int, list[int]], batch_size: int,
                 sink_ratio: float | None = 4.0, max_values: int = 2000, seed: int = 0,
                 quiet: bool = True) -> dict[Feature, _Stats]:
    """One pass over the corpus: per latent, its per-text maxima (away from sinks and anywhere),
    its non-zero values (a seeded uniform sample of `max_values` beyond that), and its firings on
    sinks/BOS. Residuals and activations stay on the model's device; per chunk only per-text
    maxima, counts and the non-zero values cross to the host, [b, T, COLS] latents at a time."""
    from tqdm.auto import tqdm

    n = len(batch)
    # a generator per layer: a layer's sample is the same whichever layers share its pass
    tables = {l: _LayerTables(n, len(ix), max_values, torch.Generator().manual_seed(seed))
              for l, ix in by_layer.items()}
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="dashboards (corpus)", disable=quiet or len(starts) <= 1, leave=False):
        sub = batch.rows(start, min(start + batch_size, n))
        res = model.residuals(sub, list(by_layer), host=False)
        pad = (sub.input_ids.shape[1] - sub.lengths).unsqueeze(1)
        rows = slice(start, start + len(sub))
        for l, ix in by_layer.items():
            sink, bos = sink_mask(model, sub, res[l], sink_ratio)
            valid = sub.attention_mask.bool().to(res[l].device).unsqueeze(-1)
            for c0 in range(0, len(ix), COLS):
                acts = subset_acts(saes[l], res[l], ix[c0:c0 + COLS], host=False)
                acts = acts * valid.to(acts.device)
                tables[l].update(rows, slice(c0, c0 + acts.shape[-1]), acts, sink.to(acts.device),
                                 bos.to(acts.device), pad)
        del res
    return {Feature(l, i): s for l, ix in by_layer.items() for i, s in zip(ix, tables[l].stats())}


def _pick(stats: _Stats, top_k: int, bands: int, per_band: int, rng: random.Random) -> tuple[list, list, bool]:
    """(top texts, quantile bands [(lo, hi, texts)], ranked at sinks?)."""
    at_sink = not bool((stats.best > 0).any()) and bool((stats.best_all > 0).any())
    vals = stats.best_all if at_sink else stats.best
    order = sorted((t for t in range(len(vals)) if vals[t] > 0), key=lambda t: (-float(vals[t]), t))
    top, rest = order[:top_k], order[top_k:]
    out = []
    if rest and bands > 0:
        asc = rest[::-1]
        size = max(1, -(-len(asc) // bands))
        for b in range(0, len(asc), size):
            group = asc[b:b + size]
            out.append((float(vals[group[0]]), float(vals[group[-1]]),
                        sorted(rng.sample(group, min(per_band, len(group))), key=lambda t: -float(vals[t]))))
    return top, out[::-1], at_sink


# ----------------------------------------------------------------- corpus pass 2: windows
def token_windows(
    model: ChatModel,
    saes,
    batch: PromptBatch,
    wanted: Mapping[Feature, dict[int, int]],
    batch_size: int,
    left: int,
    right: int,
    sink_ratio: float | None,
) -> dict[tuple[Feature, int], TokenWindow]:
    """For each latent and each of its texts (text -> peak token index), the window of tokens
    around the peak with the latent's activation on each. Only the chunks that hold a chosen text
    are read again, and per chunk only the latents wanted on one of its texts are encoded."""
    on_text: dict[int, dict[int, list[int]]] = {}  # text -> layer -> latents wanted there
    for f, m in wanted.items():
        for t in m:
            on_text.setdefault(t, {}).setdefault(f.layer, []).append(f.index)
    if not on_text:
        return {}
    layers = sorted({f.layer for f in wanted})
    tok = model.tokenizer
    out = {}
    # the corpus pass's own chunks (the same padding as pass 1, whichever latents are wanted),
    # skipping those that hold no wanted text
    for start in range(0, len(batch), batch_size):
        sub = batch.rows(start, min(start + batch_size, len(batch)))
        chunk = [t for t in range(start, start + len(sub)) if t in on_text]
        if not chunk:
            continue
        res = model.residuals(sub, layers, host=False)
        T = sub.input_ids.shape[1]
        ids = {t: sub.input_ids[t - start, T - int(sub.lengths[t - start]):].tolist() for t in chunk}
        words = {t: [tok.decode([x], skip_special_tokens=False) for x in row] for t, row in ids.items()}
        for l in layers:
            need = sorted({i for t in chunk for i in on_text[t].get(l, ())})
            if not need:
                continue
            sink = sink_mask(model, sub, res[l], sink_ratio)[0].cpu()
            for c0 in range(0, len(need), COLS):
                cols = need[c0:c0 + COLS]
                acts = subset_acts(saes[l], res[l], cols)
                for t in chunk:
                    b = t - start
                    n_tok, at = len(ids[t]), T - len(ids[t])
                    for j, i in enumerate(cols):
                        f = Feature(l, i)
                        peak = wanted[f].get(t) if f in wanted else None
                        if peak is None:
                            continue
                        lo, hi = max(0, peak - left), min(n_tok, peak + right + 1)
                        a = acts[b, at + lo:at + hi, j].tolist()
                        sk = sink[b, at + lo:at + hi].nonzero().flatten().tolist()
                        out[(f, t)] = TokenWindow(t, peak, peak - lo, float(acts[b, at + peak, j]),
                                                  words[t][lo:hi], [round(x, 4) for x in a], sk)
        del res
    return out


# ----------------------------------------------------------------- assembly
def histogram(values: Sequence[torch.Tensor], bins: int) -> dict:
    v = torch.cat(list(values)) if values else torch.zeros(0)
    if not len(v):
        return {"edges": [], "counts": [], "sampled": 0}
    hi = float(v.max())
    counts = torch.histc(v, bins=bins, min=0.0, max=hi if hi > 0 else 1.0)
    edges = torch.linspace(0.0, hi if hi > 0 else 1.0, bins + 1)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts], "sampled": len(v)}


def corpus_dashboards(model: ChatModel, saes, texts: Sequence[str], features: Iterable, *, batch_size: int = 16,
                      max_length: int | None = 128, top_k: int = 10, bands: int = 3, per_band: int = 2,
                      left: int = 12, right: int = 4, bins: int = 30, sink_ratio: float | None = 4.0,
                      max_values: int = 2000, seed: int = 0, quiet: bool = True) -> dict[Feature, dict]:
    """The corpus part of each dashboard: histogram (of at most `max_values` sampled non-zero
    values per latent), top contexts, quantile samples, sink share."""
    if not texts:
        raise UserError("no corpus texts for dashboards: set dashboards.corpus to a prompt set")
    by_layer = FeatureSet(features).checked(saes).by_layer()
    bos = model.tokenizer.bos_token
    texts = [t if not bos or t.startswith(bos) else bos + t for t in texts]
    batch = model.encode_texts(texts, add_special_tokens=False, max_length=max_length)
    stats = corpus_stats(model, saes, batch, by_layer, batch_size, sink_ratio, max_values, seed=seed, quiet=quiet)
    rngs = {layer: random.Random(seed) for layer in by_layer}  # per layer, as the sample above
    picks = {f: _pick(s, top_k, bands, per_band, rngs[f.layer]) for f, s in stats.items()}
    wanted: dict[Feature, dict[int, int]] = {}
    for f, (top, qs, at_sink) in picks.items():
        where = stats[f].where_all if at_sink else stats[f].where
        for t in top + [t for *_, ts in qs for t in ts]:
            wanted.setdefault(f, {})[t] = int(where[t])
    win = token_windows(model, saes, batch, wanted, batch_size, left, right, sink_ratio)
    n_tokens = int(batch.attention_mask.sum())
    out: dict[Feature, dict] = {}
    for f, s in stats.items():
        top, qs, _ = picks[f]
        out[f] = {"n_texts": len(texts), "n_tokens": n_tokens, "n_nonzero": s.n_nonzero,
                  "max_activation": round(float(s.best_all.max()) if len(s.best_all) else 0.0, 4),
                  "histogram": histogram(s.values, bins), "top": [win[(f, t)] for t in top],
                  "quantiles": [{"low": lo, "high": hi, "samples": [win[(f, t)] for t in ts]} for lo, hi, ts in qs],
                  "sink_share": round(s.n_sink / s.n_nonzero, 4) if s.n_nonzero else 0.0,
                  "bos_texts": s.bos_texts, "max_at_sink": round(s.max_sink, 4)}
    return out


def prompt_tokens(model: ChatModel, prompts: Prompts) -> list[dict]:
    """Per (id, text) prompt, its chat-formatted tokens as the pipeline saw them and the region
    of each (activity.REGIONS): positions line up with the hydra analysis's wake-up records."""
    if not prompts:
        return []
    texts = [t for _, t in prompts]
    batch = model.encode(texts)
    n_pre = prefix_lengths(model, texts)
    out = []
    for r, (pid, _) in enumerate(prompts):
        ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        out.append({"id": pid, "tokens": [model.tokenizer.decode([i], skip_special_tokens=False) for i in ids],
                    "regions": [region(p, n_pre[r], len(ids), batch.n_post[r]) for p in range(len(ids))]})
    return out


def window_explanation(top: Sequence[TokenWindow]) -> str:
    """An activation-based explanation from top contexts (the format `semantics` writes), for
    latents with no explanation yet, such as the human study's random latents."""
    from .semantics import activation_explanation

    return activation_explanation([{"token": w.tokens[w.peak], "context": "".join(
        w.tokens[:w.peak]) + f"[[{w.tokens[w.peak]}]]" + "".join(w.tokens[w.peak + 1:])} for w in top])
