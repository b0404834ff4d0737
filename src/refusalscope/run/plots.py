"""Figures the stages write next to their tables (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..artifacts import atomic_write  # noqa: E402


def save(fig, path: Path) -> Path:
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def cosine_profile(mean_harmful, mean_harmless, one_harmful, one_harmless, layer: int,
                   titles: tuple[str, str], path: Path) -> Path:
    """Paper Figs 4/5: cosine of the last-token stream with r̂(l*) across layers."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(mean_harmful))
    ax.plot(xs, mean_harmful, color="tab:red", label="harmful (mean)")
    ax.plot(xs, mean_harmless, color="tab:blue", label="harmless (mean)")
    ax.plot(xs, one_harmful, color="tab:red", ls="--", lw=1, label=f"harmful: {titles[0][:40]}")
    ax.plot(xs, one_harmless, color="tab:blue", ls="--", lw=1, label=f"harmless: {titles[1][:40]}")
    ax.axvline(layer, color="grey", ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"cos(h, r̂({layer}))")
    ax.legend(fontsize=7)
    ax.set_title("Last-token alignment with the refusal direction")
    return save(fig, path)


def direction_candidates(table: pd.DataFrame, path: Path) -> Path:
    """Per candidate layer: P(refusal) with r̂ ablated, KL on harmless, ASR where judged."""
    t = table[table["position"] == table.loc[table["selected"], "position"].iloc[0]].sort_values("layer")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(t["layer"], t["p_refusal_ablated"], marker="o", label="P(refusal) ablated (val harmful)")
    ax.plot(t["layer"], t["kl_harmless"].clip(upper=2), marker="s", label="KL on harmless (clipped at 2)")
    judged = t.dropna(subset=["asr_val"])
    ax.scatter(judged["layer"], judged["asr_val"], color="tab:red", zorder=3, label="ASR (val, judged)")
    sel = t[t["selected"]]
    ax.axvline(int(sel["layer"].iloc[0]), color="grey", ls=":", lw=1, label=f"chosen l* = {int(sel['layer'].iloc[0])}")
    ax.set_xlabel("layer")
    ax.set_ylabel("probability / share / KL (nats)")
    ax.legend(fontsize=7)
    ax.set_title("Refusal-direction candidates")
    return save(fig, path)


def k_distribution(ks: list, k_max: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    found = [k for k in ks if k is not None]
    ax.hist(found, bins=range(0, k_max + 20, 10), color="tab:purple")
    ax.set_xlabel("smallest jailbreaking K (latents per layer)")
    ax.set_ylabel("prompts")
    ax.set_title(f"Stage 1: {len(found)} of {len(ks)} prompts jailbroken")
    return save(fig, path)


def stage2_sizes(table: pd.DataFrame, path: Path) -> Path:
    """Per τ: mean consensus-set size and share of prompts whose set jailbreaks."""
    g = table.groupby("tau").agg(size=("size", "mean"), jailbroken=("jailbroken", "mean")).reset_index()
    fig, ax1 = plt.subplots(figsize=(6, 3.2))
    ax1.bar(g["tau"], g["size"], width=0.06, color="tab:green", label="mean set size")
    ax1.set_xlabel("τ")
    ax1.set_ylabel("latents")
    ax2 = ax1.twinx()
    ax2.plot(g["tau"], g["jailbroken"], color="tab:red", marker="o", label="jailbroken share")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("jailbroken share")
    ax1.set_title("Stage 2 over the τ sweep")
    return save(fig, path)


def obrien_curve(per_k: list[dict], path: Path) -> Path:
    """Paper Fig 6: ASR of ablating latents active on ≥ k prompt tokens."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["k"] for r in per_k], [r["asr"] for r in per_k], marker="o", color="tab:orange")
    ax.set_xlabel("k (latent active on at least k prompt tokens)")
    ax.set_ylabel("ASR")
    ax.set_ylim(0, 1)
    ax.set_title("O'Brien-style baseline")
    return save(fig, path)
