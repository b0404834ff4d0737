"""Downstream cost of the interventions (paper appendix "Downstream Performance", Table 9):
next-token cross-entropy on instruction and general texts for the unablated model, refusal
direction ablation at every layer, and each prompt's feature set ablated on its own.

The loss of a dataset is pooled over all real next-token positions (padding masked), i.e. the
token-weighted mean. For feature ablation every set gives one dataset loss; the table reports the
mean and (sample) standard deviation over sets. All settings run as batched rows: feature rows are
(set × text) with one plan each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import mean, stdev

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..artifacts import Checkpoint
from ..errors import UserError
from ..interventions.engine import intervene
from ..interventions.features import FeatureSet
from ..interventions.spec import DirectionAblation, Intervention
from ..io.model import ChatModel, PromptBatch


@dataclass
class TextSet:
    """Texts of one dataset: raw text (BOS prepended), or chat-formatted instructions with the
    optional `replies` appended after the assistant header."""

    name: str
    texts: Sequence[str]
    chat: bool = False
    replies: Sequence[str] | None = None


def encode_texts(model: ChatModel, ds: TextSet, max_length: int | None = None) -> PromptBatch:
    if not ds.texts:
        raise UserError(f"dataset {ds.name!r} has no texts: pass at least one")
    if ds.chat:
        replies = list(ds.replies) if ds.replies is not None else [None] * len(ds.texts)
        if len(replies) != len(ds.texts):
            raise UserError(f"dataset {ds.name!r}: {len(replies)} replies for {len(ds.texts)} "
                            "instructions: pass one reply per instruction")
        texts = [model.format_chat(t, r) for t, r in zip(ds.texts, replies)]
    else:
        bos = model.tokenizer.bos_token or ""
        texts = [t if t.startswith(bos) else bos + t for t in ds.texts]
    return model.encode_texts(texts, add_special_tokens=False, max_length=max_length)


def _run(model: ChatModel, saes, batch: PromptBatch, index: Sequence[int], plans, shared,
         batch_size: int, quiet: bool, desc: str, checkpoint: Checkpoint | None = None) -> tuple[Tensor, Tensor]:
    """Loss sums and counts for rows `index` of `batch` (plans[i] for row i), chunk by chunk; the
    loss is computed on the model's device (`ChatModel.next_token_losses`), so full-vocabulary
    logits never leave it. With a `checkpoint`, each chunk's sums and counts are appended under
    "`desc`/start" and chunks found there are read back instead of run."""
    sums, counts = [], []
    starts = range(0, len(index), batch_size)
    for s in tqdm(starts, desc=desc, disable=quiet or len(starts) <= 1, leave=False):
        key = f"{desc}/{s}"
        if checkpoint is not None and key in checkpoint:
            rec = checkpoint.records[key]
            sums.append(torch.tensor(rec["sums"], dtype=torch.float64))
            counts.append(torch.tensor(rec["counts"], dtype=torch.float64))
            continue
        sub = batch.select(list(index[s:s + batch_size]))
        rows = None if plans is None else plans[s:s + batch_size]
        with intervene(model, saes, shared=shared, rows=rows):
            a, b = model.next_token_losses(sub)
        a, b = a.double().cpu(), b.double().cpu()
        if checkpoint is not None:
            checkpoint.add({"key": key, "sums": a.tolist(), "counts": b.tolist()})
        sums.append(a)
        counts.append(b)
    return torch.cat(sums), torch.cat(counts)


def ce_table(model: ChatModel, saes, datasets: Sequence[TextSet], direction: Tensor | None,
             sets: Mapping | Sequence, batch_size: int = 8, max_length: int | None = 256,
             quiet: bool = True, checkpoint: Checkpoint | None = None) -> list[dict]:
    """Rows {dataset, setting, mean, std, n_texts, n_tokens, n_sets} for settings baseline,
    direction (DirectionAblation(r̂) at the embedding and every layer output) and features
    (std over sets; None for single-model settings). With a `checkpoint` (key "key") every chunk
    of rows is checkpointed, so an interrupted table resumes from its last finished chunk."""
    set_list = [list(s) for s in (sets.values() if isinstance(sets, Mapping) else sets)]
    out = []
    for ds in datasets:
        batch = encode_texts(model, ds, max_length)
        n = len(batch)
        base = {"dataset": ds.name, "n_texts": n}
        settings: list[tuple[str, list[Intervention]]] = [("baseline", [])]
        if direction is not None:
            settings.append(("direction", [DirectionAblation(direction)]))
        for name, shared in settings:
            s, c = _run(model, saes, batch, range(n), None, shared, batch_size, quiet,
                        f"CE {ds.name} {name}", checkpoint)
            out.append({**base, "setting": name, "mean": float(s.sum() / c.sum()), "std": None,
                        "n_tokens": int(c.sum()), "n_sets": None})
        if set_list:
            index = [i for _ in set_list for i in range(n)]
            plans = [FeatureSet(fs).plan() for fs in set_list for _ in range(n)]
            s, c = _run(model, saes, batch, index, plans, (), batch_size, quiet, f"CE {ds.name} features",
                        checkpoint)
            per_set = (s.view(len(set_list), n).sum(1) / c.view(len(set_list), n).sum(1)).tolist()
            out.append({**base, "setting": "features", "mean": mean(per_set),
                        "std": stdev(per_set) if len(per_set) > 1 else 0.0,
                        "n_tokens": int(c[:n].sum()), "n_sets": len(set_list)})
    return out


def loss_sum(model: ChatModel, saes, ds: TextSet, shared: Sequence = (), batch_size: int = 8,
             max_length: int | None = 256, quiet: bool = True) -> tuple[float, int]:
    """Summed next-token CE over a dataset's real positions under one intervention applied to
    every text, and the number of positions (sum / count = the table's token-weighted mean)."""
    batch = encode_texts(model, ds, max_length)
    s, c = _run(model, saes, batch, range(len(batch)), None, list(shared), batch_size, quiet, f"CE {ds.name}")
    return float(s.sum()), int(c.sum())
