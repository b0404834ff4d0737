"""`--to neuronpedia`: the found sets in the forms Neuronpedia takes (read from its source, 2026-08):

- a quick list per set, no account needed: `/quick-list/?name=…&features=` + url-encoded JSON
  `[{modelId, layer, index}]` (`layer` is the SAE source id, e.g. "12-gemmascope-res-65k"; `index` a
  string as Neuronpedia stores it); the page refuses more than 150 features, so larger sets split;
- the body of `POST /api/list/new-with-features` per set ({name, description, testText, features:
  [{modelId, layer, index, description}]}), at most 100 features a body (the add-features limit),
  with our explanation and numbers as each description;
- the refusal direction as the body of `POST /api/vector/new` ({modelId, layerNumber, hookType,
  vector, vectorDefaultSteerStrength, vectorLabel}); hookType is one of the keys Neuronpedia checks
  (`hook_resid_post`: our direction lives at the output of layer l*).

SAEs without Neuronpedia pages (the demo world, local folders without `saes.neuronpedia_id`) get a
note instead of dead links.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from ..artifacts import atomic_write_json, atomic_write_text
from ..interventions.features import Feature
from ..run.results import RunResults
from .selection import NO_NEURONPEDIA, NamedSet, SAESource, sae_source, select_sets

QUICK_LIST_MAX = 150  # app/quick-list/page.tsx: notFound() above 150
LIST_BODY_MAX = 100  # api/list/add-features: "Max is 100 at a time"
STEER_MIN, STEER_MAX = -300, 300  # lib/utils/steer.ts
BASE = "https://www.neuronpedia.org"


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)] or [[]]


def _part(name: str, i: int, n: int) -> str:
    return name if n == 1 else f"{name} ({i + 1}/{n})"


def np_id(src: SAESource, f: Feature) -> dict:
    """{modelId, layer, index} of latent `f` as Neuronpedia names it."""
    ids = src.neuronpedia(f.layer)
    assert ids is not None  # callers check has_pages() first
    return {"modelId": ids[0], "layer": ids[1], "index": str(f.index)}


def has_pages(src: SAESource) -> bool:
    return src.neuronpedia_id is not None


def quick_lists(ns: NamedSet, src: SAESource, base: str = BASE) -> list[dict]:
    """[{name, url, n}] for set `ns`, at most 150 features a URL."""
    parts = _chunks([np_id(src, f) for f in ns.features], QUICK_LIST_MAX)
    out = []
    for i, part in enumerate(parts):
        name = _part(f"refusalscope {ns.name}", i, len(parts))
        features = json.dumps(part, separators=(",", ":"))
        out.append({"name": name, "n": len(part),
                    "url": f"{base}/quick-list/?name={quote(name, safe='')}&features={quote(features, safe='')}"})
    return out


def list_bodies(ns: NamedSet, src: SAESource, descriptions: dict[Feature, str], test_text: str) -> list[dict]:
    """Bodies for POST /api/list/new-with-features, at most 100 features each."""
    feats = [{**np_id(src, f), "index": f.index, "description": descriptions.get(f, "")} for f in ns.features]
    parts = _chunks(feats, LIST_BODY_MAX)
    return [{"name": _part(f"refusalscope {ns.name}", i, len(parts)),
             "description": f"{ns.about}. SAEs: {src.description}.", "testText": test_text, "features": part}
            for i, part in enumerate(parts)]


def vector_body(res: RunResults, src: SAESource) -> dict:
    """Body for POST /api/vector/new: the unnormalised difference in means r(l*) (what ActAdd adds)."""
    layer = res.direction()[1]
    ids = src.neuronpedia(layer)
    assert ids is not None
    return {"modelId": ids[0], "layerNumber": layer, "hookType": "hook_resid_post",
            "vector": [float(x) for x in res.direction_vector().float().tolist()],
            "vectorDefaultSteerStrength": 1,
            "vectorLabel": f"refusal direction r(l*={layer}) of {src.model} (refusalscope; +1 adds refusal)"}


def descriptions(res: RunResults, sets: Sequence[NamedSet]) -> dict[Feature, str]:
    """Per latent: our explanation and numbers (in how many Stage 2 sets it is)."""
    expl = {Feature.of(k): v for k, v in res.explanations().items()} if res.done("semantics") else {}
    counts: Counter = Counter()
    n = 0
    if res.done("stage2"):
        s2 = res.stage2_sets()
        n = len(s2)
        counts = Counter(f for s in s2.values() for f in s)
    out = {}
    for f in {f for s in sets for f in s.features}:
        bits = [expl[f]] if expl.get(f) else []
        if n:
            bits.append(f"in {counts[f]} of {n} Stage 2 sets")
        out[f] = "refusalscope: " + "; ".join(bits) if bits else "refusalscope"
    return out


def test_text(res: RunResults, ns: NamedSet) -> str:
    """The prompt a per-prompt set was found on, else the first refused prompt."""
    prompts = {p.id: p.text for p in res.kept_prompts()}
    pid = ns.name.partition("/")[2]
    return prompts.get(pid) or next(iter(prompts.values()), "How do I build a bomb?")


def write(run_dir: Path, out: Path, sets: Sequence[str] | None = None, base_url: str = BASE, **_: object) -> dict:
    res = RunResults(run_dir)
    named = select_sets(res, sets)
    src = sae_source(res)
    if not has_pages(src):
        note = NO_NEURONPEDIA.format(what=src.description)
        atomic_write_text(out / "README.md", f"# Neuronpedia export\n\n{note}\n")
        return {"files": ["README.md"], "notes": [note], "sets": len(named)}
    desc = descriptions(res, named)
    quick = [{"set": ns.name, **q} for ns in named for q in quick_lists(ns, src, base_url)]
    bodies = [b for ns in named for b in list_bodies(ns, src, desc, test_text(res, ns))]
    files = ["quick_lists.md", "lists.json"]
    atomic_write_text(out / "quick_lists.md", "# Neuronpedia quick lists (no account needed)\n\n" + "".join(
        f"- [{q['name']}]({q['url']}) ({q['n']} latents)\n" for q in quick))
    atomic_write_json(out / "lists.json", bodies)
    if res.done("direction"):
        atomic_write_json(out / "vector.json", vector_body(res, src))
        files.append("vector.json")
    return {"files": files, "sets": len(named), "quick_lists": len(quick), "list_bodies": len(bodies)}
