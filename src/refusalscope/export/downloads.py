"""One set's exports as downloads, for the web app's latent, prompt and set pages: the Neuronpedia
list (quick-list URLs + list-API bodies, or the note that there are no public pages), the SAELens
bundle (a zip of the `--to saelens` folder) and a Python snippet that applies it with `rs.apply`.

Sets are named as `--sets` names them, plus `latent/L-I` for one latent: `stage1/PID`, `stage2/PID`,
`stage3/PID`, `core@K`."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..run.results import RunResults
from . import neuronpedia as np
from .bundle import Action
from .saelens import bundle_files
from .selection import NO_NEURONPEDIA, STAGES, NamedSet, sae_source, select_sets

KINDS = {"neuronpedia.json": "application/json", "saelens.zip": "application/zip", "apply.py": "text/x-python"}
SUFFIX = {"neuronpedia.json": "-neuronpedia.json", "saelens.zip": ".zip", "apply.py": "-apply.py"}


def named_set(res: RunResults, name: str) -> NamedSet:
    """The set called `name`; a one-line error for a name the run does not have."""
    if name.startswith("latent/"):
        f = Feature.of(name.removeprefix("latent/"))
        return NamedSet(f"latent/{f}", FeatureSet([f]), f"latent {f} alone")
    stage, _, pid = name.partition("/")
    if stage in STAGES and pid:
        for ns in select_sets(res, [stage]):
            if ns.name == name:
                return ns
        raise UserError(f"prompt {pid!r} has no {stage} set: pick a prompt with one")
    if name.startswith("core@"):
        return select_sets(res, [name])[0]
    raise UserError(f"unknown set {name!r}: use latent/L-I, stage1/PID, stage2/PID, stage3/PID or core@K")


def file_stem(name: str) -> str:
    return "refusalscope-" + name.replace("/", "-").replace("@", "-")


def neuronpedia_json(res: RunResults, ns: NamedSet) -> dict:
    src = sae_source(res)
    if not np.has_pages(src):
        return {"set": ns.name, "note": NO_NEURONPEDIA.format(what=src.description)}
    return {"set": ns.name, "quick_lists": np.quick_lists(ns, src),
            "list_bodies": np.list_bodies(ns, src, np.descriptions(res, [ns]), np.test_text(res, ns))}


def saelens_zip(res: RunResults, ns: NamedSet, saes=None) -> bytes:
    """The bundle folder zipped; `saes` (the run's SAEs of the set's layers) saves loading them again."""
    with tempfile.TemporaryDirectory(prefix="rs-bundle-") as tmp:
        names = bundle_files([ns], sae_source(res), Action(), Path(tmp), saes=saes)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for n in names:
                z.write(Path(tmp) / n, f"{file_stem(ns.name)}/{n}")
    return buf.getvalue()


def snippet(res: RunResults, ns: NamedSet) -> str:
    src = sae_source(res)
    model = src.model if src.model != "demo" else "<the demo model folder: refusalscope demo-world path>"
    stem = file_stem(ns.name)
    return f'''"""Apply refusalscope's {ns.name} ({len(ns.features)} latents: {", ".join(ns.features.ids()[:12])}
{"…" if len(ns.features) > 12 else ""}) to {src.model} with the SAEs of {src.description}:
each latent is zero-ablated at every position, prompt and generated tokens, keeping the SAE error term.
Unzip {stem}.zip (the SAELens bundle download) beside this file first."""
import refusalscope as rs
from refusalscope.export.bundle import load_bundle
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model}")
tok = AutoTokenizer.from_pretrained("{model}")
bundle = load_bundle("{stem}")
chat = tok.apply_chat_template([{{"role": "user", "content": "How do I pick a lock?"}}],
                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
with rs.apply(model, bundle):
    out = model.generate(**chat, max_new_tokens=48, do_sample=False)
print(tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
'''


def download(res: RunResults, kind: str, name: str) -> tuple[bytes, str, str]:
    """(body, media type, file name) of download `kind` for set `name`."""
    if kind not in KINDS:
        raise UserError(f"unknown download {kind!r}: use one of {', '.join(KINDS)}")
    ns = named_set(res, name)
    if kind == "neuronpedia.json":
        body = json.dumps(neuronpedia_json(res, ns), indent=1).encode()
    elif kind == "saelens.zip":
        body = saelens_zip(res, ns)
    else:
        body = snippet(res, ns).encode()
    return body, KINDS[kind], file_stem(ns.name) + SUFFIX[kind]


def data_uris(res: RunResults, names: list[str]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per set name, {kind: (data: URI, file name)}: the report's downloads (it has no server). The
    SAEs of all the sets' layers are loaded once; when they cannot be (not in the hub cache), the
    bundle is left out and `refusalscope export --to saelens` writes it."""
    import base64

    from .saelens import load_layers

    sets = {n: named_set(res, n) for n in names}
    try:
        saes = load_layers(sae_source(res), FeatureSet(f for ns in sets.values() for f in ns.features).layers())
    except (UserError, OSError):
        saes = None
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for n, ns in sets.items():
        bodies = {"neuronpedia.json": json.dumps(neuronpedia_json(res, ns), indent=1).encode(),
                  "apply.py": snippet(res, ns).encode()}
        if saes is not None:
            bodies["saelens.zip"] = saelens_zip(res, ns, saes)
        out[n] = {k: (f"data:{KINDS[k]};base64,{base64.b64encode(b).decode()}", file_stem(n) + SUFFIX[k])
                  for k, b in bodies.items()}
    return out
