"""Figures drawn at report time from a run's numbers, for results no stage plotted (the stages'
own PNGs are inlined as they are). Each returns PNG bytes; `data_uri` inlines them in HTML."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes | Path) -> str:
    """A `data:` URI of a PNG (bytes or a file), so pages and the report need no file server."""
    raw = png.read_bytes() if isinstance(png, Path) else png
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def probe_vs_fm(rows: Sequence[dict]) -> bytes:
    """Paper "FM vs linear probe": jailbroken prompts per K for each ranking."""
    ks = [str(r["k"]) for r in rows]
    xs = range(len(ks))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([x - 0.2 for x in xs], [r["fm"] for r in rows], width=0.4, color="tab:purple", label="FM embedding rank")
    ax.bar([x + 0.2 for x in xs], [r["probe"] for r in rows], width=0.4, color="tab:gray", label="linear-probe weight")
    ax.set_xticks(list(xs), ks)
    ax.set_xlabel("K (top ranked latents ablated with the active Stage 2 set)")
    ax.set_ylabel("jailbroken prompts")
    ax.set_title("Stage 3: FM vs linear probe")
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _png(fig)


def wake_regions(shares: dict, n_woken: int) -> bytes:
    """Hydra: where woken latents fire once the active set is ablated (share of firings)."""
    names = [k for k in ("bos", "system", "instruction", "post_instruction") if k in shares]
    vals = [shares[k] or 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(6, 3.0))
    bars = ax.bar([n.replace("_", "-") for n in names], [100 * v for v in vals],
                  color=["tab:red", "tab:orange", "tab:blue", "tab:green"][: len(names)])
    ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.set_ylabel("share of firings (%)")
    ax.set_xlabel("prompt region")
    ax.set_ylim(0, 105)
    ax.set_title(f"Where {n_woken} woken hydra latents fire")
    return _png(fig)


def random_vs_critical(per_seed: Sequence[dict], n_critical: int, n_prompts: int) -> bytes:
    """Jailbreaks by the Stage 2 sets vs equally many random active latents, per seed."""
    labels = ["Stage 2 sets"] + [f"random, seed {r['seed']}" for r in per_seed]
    vals = [n_critical] + [r["jailbroken"] for r in per_seed]
    fig, ax = plt.subplots(figsize=(6, 3.0))
    bars = ax.bar(labels, vals, color=["tab:red"] + ["tab:gray"] * len(per_seed))
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel(f"jailbroken prompts (of {n_prompts})")
    ax.set_title("Critical latents vs random active latents of the same layers")
    ax.tick_params(axis="x", labelsize=8)
    return _png(fig)


def ce_loss(rows: Sequence[dict]) -> bytes:
    """Table 9 as bars: mean CE loss per dataset and setting."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(6, 3.0))
    for j, s in enumerate(settings):
        vals = [next((r["mean"] for r in rows if r["dataset"] == d and r["setting"] == s), 0.0) for d in datasets]
        ax.bar([i + (j - (len(settings) - 1) / 2) * width for i in range(len(datasets))], vals, width=width, label=s)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Table 9: CE loss under ablation")
    ax.legend(fontsize=8, ncol=len(settings), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return _png(fig)


def activation_histogram(hist: dict, feature: str) -> bytes:
    """A latent's non-zero activations on the corpus (SAEDashboard's activation density plot)."""
    edges, counts = hist.get("edges", []), hist.get("counts", [])
    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    if counts:
        widths = [b - a for a, b in zip(edges, edges[1:])]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:orange", edgecolor="white", lw=0.3)
    ax.set_xlabel("activation (non-zero tokens)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Latent {feature}: activation histogram ({sum(counts)} tokens)", fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(fig)
