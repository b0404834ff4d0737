"""Figures of the eval stage: the intervention × dataset heatmap, refusal vs side effects (each
intervention a point), and the held-out jailbreak rate of the core set as it grows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .plots import plt, save

KIND_COLORS = {"none": "black", "direction": "tab:red", "actadd": "tab:pink", "core": "tab:blue",
               "core_category": "tab:cyan", "stage2_union": "tab:purple", "critical_union": "tab:brown",
               "random": "tab:gray", "bos_clamp": "tab:orange"}


def _prompt_columns(table: pd.DataFrame) -> list[tuple[str, str]]:
    t = table[table["part"] != "text"]
    return list(dict.fromkeys(zip(t["dataset"], t["part"])))


def _value(t: pd.DataFrame, iv: str, ds: str, part: str, col: str) -> float:
    v = t[(t["intervention"] == iv) & (t["dataset"] == ds) & (t["part"] == part)][col]
    return float(v.iloc[0]) if len(v) and pd.notna(v.iloc[0]) else np.nan


def side_effects(table: pd.DataFrame, iv: str) -> dict[str, float]:
    """Degenerate share over all prompts, KL on harmless prompts, ΔCE on general text."""
    t = table[table["intervention"] == iv]
    p = t[t["part"] != "text"]
    safe = p[p["part"] == "harmless"]
    ce = t[t["part"] == "text"]["ce_delta"]
    return {"degenerate": float((p["degenerate_rate"] * p["n"]).sum() / p["n"].sum()) if len(p) else np.nan,
            "KL harmless": float((safe["kl"] * safe["n"]).sum() / safe["n"].sum()) if len(safe) else np.nan,
            "ΔCE general": float(ce.iloc[0]) if len(ce) and pd.notna(ce.iloc[0]) else np.nan}


def heatmap(table: pd.DataFrame, rows, path: Path) -> Path:
    """Left: refusal rate per dataset part (harmful parts: high = still refusing; harmless
    parts: high = over-refusing). Right: side effects, coloured per column."""
    order = [r.name for r in rows]
    labels = [f"{r.name} (= {r.same_as})" if r.same_as else r.name for r in rows]
    cols = _prompt_columns(table)
    ref = np.array([[_value(table, iv, ds, part, "refusal_rate") for ds, part in cols] for iv in order])
    side = [side_effects(table, iv) for iv in order]
    names = list(side[0]) if side else []
    eff = np.array([[s[n] for n in names] for s in side])
    h = max(3.0, 0.32 * len(order) + 1.5)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(cols) + 3.5, h),
                                 gridspec_kw={"width_ratios": [max(1, len(cols)), max(1, len(names))]})
    im = a1.imshow(ref, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    _annotate(a1, ref, ref, lambda v: f"{100 * v:.0f}")
    a1.set_xticks(range(len(cols)), [f"{ds}\n{part}" for ds, part in cols], fontsize=8)
    a1.set_yticks(range(len(order)), labels, fontsize=8)
    a1.set_title("Refusal rate (%)")
    a1.set_xlabel("harmful parts: refusal kept; harmless parts: over-refusal", fontsize=8)
    fig.colorbar(im, ax=a1, fraction=0.04, label="refusal rate")
    if names:
        scale = np.array([np.nanmax(c) if np.isfinite(c).any() and np.nanmax(c) > 0 else 1.0
                          for c in np.abs(eff).T])
        shade = np.abs(eff) / scale
        a2.imshow(shade, vmin=0, vmax=1, cmap="Oranges", aspect="auto")
        _annotate(a2, eff, shade, lambda v: f"{v:.3g}")
        a2.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
        a2.set_yticks(range(len(order)), [])
        a2.set_title("Side effects (colour: share of column max)")
    fig.suptitle("Interventions × datasets")
    return save(fig, path)


def _annotate(ax, m: np.ndarray, shade: np.ndarray, fmt) -> None:
    """Each cell's value, white on dark cells."""
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=7,
                    color="white" if shade[i, j] > 0.6 else "black")


def harmful_column(table: pd.DataFrame) -> tuple[str, str] | None:
    """The harmful part the jailbreak axis reads: held-out prompts, else the search split, else
    the first harmful part."""
    cols = [c for c in _prompt_columns(table) if c[1] == "harmful"]
    for want in ("heldout", "search"):
        if (want, "harmful") in cols:
            return want, "harmful"
    return cols[0] if cols else None


def tradeoff(table: pd.DataFrame, rows, path: Path) -> Path:
    """Jailbreak rate on harmful prompts against KL on harmless prompts and ΔCE on general text."""
    col = harmful_column(table)
    xs = [x for x in ("KL harmless", "ΔCE general")
          if any(np.isfinite(side_effects(table, r.name)[x]) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(xs)), figsize=(6 * max(1, len(xs)), 4.4), squeeze=False)
    seen = set()
    rows = [r for r in rows if r.same_as is None]  # rows with identical latents share one point
    for ax, x in zip(axes[0], xs or ["KL harmless"]):
        for r in rows:
            y = _value(table, r.name, *col, "jailbreak_rate") if col else np.nan
            xv = side_effects(table, r.name)[x]
            if not (np.isfinite(y) and np.isfinite(xv)):
                continue
            first = r.kind not in seen
            seen.add(r.kind)
            ax.scatter(xv, y, color=KIND_COLORS.get(r.kind, "black"), s=18 if r.kind == "random" else 40,
                       alpha=0.6 if r.kind == "random" else 0.9, label=r.kind if first else None, zorder=3)
            if r.kind != "random":
                ax.annotate(r.name, (xv, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("KL(plain ‖ intervened) on harmless prompts (nats)" if x == "KL harmless"
                      else "ΔCE on general text vs no intervention (nats / token)")
        ax.set_ylabel(f"jailbreak rate ({col[0]} harmful prompts)" if col else "jailbreak rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle("Refusal removed vs side effects (each point one intervention)")
    return save(fig, path)


def core_curve(table: pd.DataFrame, rows, path: Path) -> Path:
    """Jailbreak rate of the core set by its size, against matched random latents (mean and
    range over seeds) and the refusal direction."""
    col = harmful_column(table)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    cores = [r for r in rows if r.kind == "core" and r.same_as is None]
    if col:
        y = lambda name: _value(table, name, *col, "jailbreak_rate")  # noqa: E731
        ax.plot([r.size for r in cores], [y(r.name) for r in cores], marker="o", color=KIND_COLORS["core"],
                label="core set (most often critical)")
        rnd = [(c.size, [y(r.name) for r in rows if r.kind == "random" and r.matched == c.name]) for c in cores]
        rnd = [(n, v) for n, v in rnd if v]
        if rnd:
            ax.plot([n for n, _ in rnd], [np.mean(v) for _, v in rnd], marker="s", color=KIND_COLORS["random"],
                    label="random active latents (mean over seeds)")
            ax.fill_between([n for n, _ in rnd], [min(v) for _, v in rnd], [max(v) for _, v in rnd],
                            color=KIND_COLORS["random"], alpha=0.2, label="random: min–max")
        for name, style in (("direction", "--"), ("none", ":")):
            if any(r.name == name for r in rows) and np.isfinite(y(name)):
                ax.axhline(y(name), ls=style, color=KIND_COLORS[name], label=f"{name}")
        ax.set_ylabel(f"jailbreak rate ({col[0]} harmful prompts)")
    ax.set_xlabel("latents ablated (N)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    ax.set_title("Does a shared core of critical latents transfer?")
    return save(fig, path)
