"""The demo model on the bundled over-refusal set (benign prompts that look unsafe, plus unsafe
contrasts): measured on demand, not in the build, so that the set stays out of the world's hash,
and cached in the world folder beside the build record."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ..artifacts import atomic_write_json, read_json
from ..io.prompts import bundled_file, load_bundled
from ..measures.judges import make_judge
from .corpus import generate_by_length
from .recipe import DemoRecipe
from .world import is_built, load_demo_model, world_dir

FILE = "overrefusal.json"


def _digest(recipe: DemoRecipe) -> str:
    data = bundled_file("overrefusal").read_bytes()
    return hashlib.sha256(data + recipe.eval.model_dump_json().encode()).hexdigest()[:16]


def overrefusal_rates(recipe: DemoRecipe | None = None, compute: bool = True, quiet: bool = True,
                      log: Callable[[str], None] = print) -> dict | None:
    """Refusal rates (substring judge, greedy, the quality table's reply length) on the safe and
    unsafe parts of the over-refusal set and per kind of trap; None when the world is not built
    (or `compute` is False and nothing is cached)."""
    recipe = recipe or DemoRecipe()
    path = world_dir(recipe) / FILE
    digest = _digest(recipe)
    if path.exists():
        cached = read_json(path)
        if cached.get("digest") == digest:
            return cached
    if not compute or not is_built(recipe):
        return None
    log("measuring the demo model on the over-refusal set (once; cached in the world folder)")
    prompts = load_bundled("overrefusal")
    model = load_demo_model(recipe, device="cpu")
    gen = generate_by_length(model, [p.text for p in prompts], True, recipe.eval.max_new_tokens,
                             recipe.eval.batch_size, quiet, "over-refusal set")
    v = make_judge("substring").judge([p.text for p in prompts], gen.texts)

    def row(name: str, idx: list[int]) -> dict:
        n = len(idx)
        return {"set": name, "n": n, "refused": round(sum(v.refused[i] for i in idx) / n, 4),
                "degenerate": round(sum(v.degenerate[i] for i in idx) / n, 4),
                "mean_p_I": round(float(gen.p_refusal[idx].mean()), 4)}

    parts = {"safe (over-refusal)": "harmless", "unsafe contrasts": "harmful"}
    rows = [row(name, [i for i, p in enumerate(prompts) if p.label == label]) for name, label in parts.items()]
    kinds = sorted({p.category for p in prompts}, key=str)  # str: the categories are strings
    by_kind = [row(f"safe: {k}", [i for i, p in enumerate(prompts) if p.category == k and p.label == "harmless"])
               for k in kinds]
    examples = [{"prompt": p.text, "label": p.label, "category": p.category, "reply": gen.texts[i],
                 "refused": v.refused[i]} for i, p in enumerate(prompts)]
    out = {"digest": digest, "judge": "substring", "max_new_tokens": recipe.eval.max_new_tokens,
           "rows": rows, "by_kind": by_kind, "examples": examples}
    atomic_write_json(path, out)
    return out
