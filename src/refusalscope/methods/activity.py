"""Where latents fire: the measurements every analysis shares.

- on prompts, under optional per-row ablation plans (`max_activations`, `activity`,
  `token_counts`): the engine's Recording reads each layer before that layer's own ablation,
  so a latent is seen as it computes from the stream it gets;
- on a corpus, chunk by chunk (`iter_feature_acts`), for top activations and the taxonomy;
- which part of a chat-formatted prompt a token sits in (`prefix_lengths`, `region`), for the
  hydra analysis's "system tokens".
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..interventions.engine import intervene
from ..interventions.features import Feature, FeatureSet
from ..interventions.spec import Recording
from ..io.model import ChatModel, PromptBatch
from .records import Activity

Prompts = Sequence[tuple[str, str]]  # (prompt id, text)
REGIONS = ("bos", "system", "instruction", "post_instruction")


# ----------------------------------------------------------------- per-prompt tables
def require(table: Mapping, prompts: Prompts, what: str) -> None:
    missing = [pid for pid, _ in prompts if pid not in table]
    if missing:
        raise UserError(f"{what} has no entry for prompt ids {missing[:5]}: pass one per prompt")


def lookup(sets: Mapping, prompts: Prompts, what: str = "sets") -> list[FeatureSet]:
    """Each prompt's set, in prompt order (a missing prompt is a one-line error)."""
    require(sets, prompts, what)
    return [FeatureSet(sets[pid]) for pid, _ in prompts]


# ----------------------------------------------------------------- on prompts
def max_activations(model: ChatModel, saes, texts: Sequence[str], feats: Iterable,
                    plans=None, batch_size: int = 16) -> list[dict[Feature, float]]:
    """Per text, the largest activation of each latent over its prompt tokens, under optional
    per-row plans."""
    table = FeatureSet(feats).by_layer()
    if not table or not texts:
        return [{} for _ in texts]
    rec = Recording(table)
    with intervene(model, saes, rows=plans, record=rec):
        model.logits(model.encode(list(texts)), batch_size=batch_size)
    mx = rec.max_activation(len(texts))
    return [{Feature(l, i): float(mx[l][r, c]) for l, ids in table.items() for c, i in enumerate(ids)}
            for r in range(len(texts))]


def activity(model: ChatModel, saes, prompts: Prompts, sets: Mapping, batch_size: int = 16) -> dict[str, Activity]:
    """Per prompt, its set split into latents active on the plain prompt (nonzero at some prompt
    token) and inactive ones (zero at every token)."""
    lists = lookup(sets, prompts)
    mx = max_activations(model, saes, [t for _, t in prompts], [f for s in lists for f in s],
                         batch_size=batch_size)
    return {pid: Activity(pid, FeatureSet(f for f in s if m[f] > 0), FeatureSet(f for f in s if m[f] <= 0))
            for (pid, _), s, m in zip(prompts, lists, mx)}


def token_counts(model: ChatModel, saes, texts: Sequence[str], layers: Sequence[int] | None = None,
                 batch_size: int = 16, max_elements: int = 1 << 25) -> list[dict[int, dict[int, int]]]:
    """Per text and layer, {latent: number of prompt tokens where it is active} for every latent
    of the SAE. The full encode runs inside the layer's hook, on the SAE's device and in its
    stored precision, at most `max_elements` of [rows x tokens x d_sae] at a time; only the
    (row, latent, count) triples of active latents leave the device, so nothing dense in d_sae
    is ever kept (at k = 1 a row holds tens of thousands of latents at 65k width)."""
    layers = sorted(saes.keys()) if layers is None else sorted(set(layers))
    out: list[dict[int, dict[int, int]]] = [{} for _ in texts]
    if not texts:
        return out

    def grab(layer):
        fd = saes[layer]

        def fn(h, step):
            keep = (~step.is_pad).to(fd.device)
            b_all, T = keep.shape
            rows = max(1, max_elements // max(1, T * fd.d_sae))
            for r0 in range(0, b_all, rows):
                n = ((fd.encode(h[r0:r0 + rows].to(fd.device)) > 0) & keep[r0:r0 + rows].unsqueeze(-1)).sum(1)
                nz = n.nonzero()
                counts = n[nz[:, 0], nz[:, 1]].tolist()
                for b in range(r0, min(r0 + rows, b_all)):
                    out[step.row_offset + b][layer] = {}
                for (b, i), c in zip(nz.tolist(), counts):
                    out[step.row_offset + r0 + b][layer][i] = c
        return fn

    with torch.inference_mode(), model.hooks({l: grab(l) for l in layers}):
        model.logits(model.encode(list(texts)), batch_size=batch_size)
    return out


def prefix_lengths(model: ChatModel, instructions: Sequence[str], tokenizer=None) -> list[int]:
    """Tokens before the user instruction in each chat-formatted prompt (BOS, system block, user
    header): the paper's "system tokens". Same formatting and tokenization as `model.encode`."""
    tok = tokenizer or model.tokenizer
    out = []
    for ins in instructions:
        text = model.format_chat(ins)
        start = text.rfind(ins) if ins and ins in text else len(text)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(sum(1 for s, _ in enc["offset_mapping"] if s < start))
    return out


def region(position: int, prefix_len: int, n_tokens: int, n_post: int) -> str:
    """Which of REGIONS token `position` of a chat-formatted prompt sits in."""
    if position == 0:
        return "bos"
    if position < prefix_len:
        return "system"
    return "instruction" if position < n_tokens - n_post else "post_instruction"


# ----------------------------------------------------------------- on a corpus
def subset_acts(fd, h: torch.Tensor, indices: Sequence[int], host: bool = True) -> torch.Tensor:
    """Activations [..., len(indices)] of only those latents: encoder columns alone for
    JumpReLU/ReLU; TopK needs the full encode because membership depends on every latent.
    fp32, on the host, or (`host=False`) on the SAE's device for callers that reduce them there."""
    h = h.to(fd.device)
    if fd.architecture == "topk":
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=fd.device)
        acts = fd.encode(h)[..., idx].float()
    else:
        acts = fd.encode_subset(h, list(indices)).float()
    return acts.cpu() if host else acts


def iter_feature_acts(model: ChatModel, saes, batch: PromptBatch, by_layer: dict[int, list[int]],
                      batch_size: int, desc: str = "features", quiet: bool = True,
                      sink_ratio: float | None = 4.0, skip: Container[int] = ()
                      ) -> Iterator[tuple[int, PromptBatch, Mapping[int, torch.Tensor]]]:
    """Per chunk of rows: (row offset, the chunk, {layer: acts [b, T, n]}) with pad columns zeroed.
    With `sink_ratio`, attention-sink positions (residual norm > sink_ratio x the row's median;
    the first token of every text in Llama-family models) are zeroed too: latents fire there on
    every text alike. Residuals are read one chunk at a time so a large corpus never sits in
    memory at once. Chunks whose row offset is in `skip` (done before a resume) are not run."""
    for start, sub, acts, sink in iter_feature_acts_and_sinks(model, saes, batch, by_layer, batch_size,
                                                              desc, quiet, sink_ratio, skip):
        yield start, sub, LayerActs(acts, lambda l, a=acts, s=sink: a[l] * (~s[l]).unsqueeze(-1))


def iter_feature_acts_and_sinks(
    model: ChatModel,
    saes,
    batch: PromptBatch,
    by_layer: dict[int, list[int]],
    batch_size: int,
    desc: str = "features",
    quiet: bool = True,
    sink_ratio: float | None = 4.0,
    skip: Container[int] = (),
) -> Iterator[tuple[int, PromptBatch, Mapping[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """`iter_feature_acts` with sink positions left in, plus per layer the [b, T] mask of sink
    positions at that layer, so a caller can count activity both ways in one pass. Chunks are cut
    from the whole batch (padded as a whole), so a chunk skipped here and computed in another
    process gives the same numbers."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    layers = list(by_layer)
    starts = [s for s in range(0, len(batch), batch_size) if s not in skip]
    for start in tqdm(starts, desc=desc, disable=quiet or len(starts) <= 1, leave=False):
        sub = batch.rows(start, min(start + batch_size, len(batch)))
        res = model.residuals(sub, layers, host=False)
        valid = sub.attention_mask.bool()
        sink = {l: sinks(res[l], valid.to(res[l].device), sink_ratio).cpu() for l in by_layer}
        acts = LayerActs(by_layer, lambda l, r=res, v=valid: subset_acts(saes[l], r[l], by_layer[l]) * v.unsqueeze(-1))
        yield start, sub, acts, sink


class LayerActs(Mapping[int, torch.Tensor]):
    """{layer: acts [b, T, n]} computed when read and never kept: a chunk's activations of every
    layer at once would hold all asked latents (tens of thousands at the paper's width)."""

    def __init__(self, layers: Iterable[int], fn):
        self._layers, self._fn = list(layers), fn

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self._layers:
            raise KeyError(layer)
        return self._fn(layer)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def sinks(h: torch.Tensor, valid: torch.Tensor, ratio: float | None) -> torch.Tensor:
    """[b, T] mask of positions whose residual norm exceeds `ratio` x the row's median."""
    if ratio is None:
        return torch.zeros_like(valid)
    norms = h.float().norm(dim=-1).masked_fill(~valid, float("nan"))
    return norms > ratio * norms.nanmedian(dim=1, keepdim=True).values
