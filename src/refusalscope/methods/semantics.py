"""What features mean: Neuronpedia explanations (cached, offline-tolerant), top-activating
examples from a local corpus (what the paper's annotators saw, Figure 7, and the explanation
source where Neuronpedia has none), and the appendix's word counts and concept groups
(Tables 4, 7, 8, 10, 11).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_write
from ..errors import UserError
from ..interventions.features import Feature, FeatureSet
from ..io.model import ChatModel
from .activity import iter_feature_acts

NEURONPEDIA = "https://www.neuronpedia.org"


_CONTEXT_TAIL = " in contexts like "  # splits our activation explanations

class NeuronpediaClient:
    """Feature explanations from the Neuronpedia API with a JSON file per feature on disk.

    `model_id_template` names the model and SAE with "{layer}", e.g.
    "gemma-2-2b/{layer}-gemmascope-res-16k" or "llama3.1-8b/{layer}-llamascope-res-32k".
    Offline (offline=True, REFUSALSCOPE_OFFLINE=1, or the first request failing to connect) it
    answers from the cache and lists what is missing instead of raising.
    """

    def __init__(self, cache_dir: str | os.PathLike, model_id_template: str,
                 offline: bool | None = None, timeout: float = 10, base_url: str = NEURONPEDIA):
        if "{layer}" not in model_id_template:
            raise UserError(f"Neuronpedia id template {model_id_template!r} has no {{layer}}: write "
                            "it like gemma-2-2b/{layer}-gemmascope-res-16k")
        self.cache_dir = Path(cache_dir)
        self.template = model_id_template.strip("/")
        self.timeout = timeout
        self.base_url = base_url.rstrip("/")
        if offline is None:
            offline = os.environ.get("REFUSALSCOPE_OFFLINE", "").strip().lower() in ("1", "true", "yes")
        self.offline = bool(offline)
        self.offline_reason = "offline mode" if self.offline else None

    def feature_path(self, feature: Feature | str) -> str:
        """"gemma-2-2b/12-gemmascope-res-16k/1234" for feature 12-1234."""
        layer, index = Feature.of(feature)
        path = self.template.replace("{layer}", str(layer))
        return path.replace("{index}", str(index)) if "{index}" in path else f"{path}/{index}"

    def url(self, feature: Feature | str) -> str:
        return f"{self.base_url}/api/feature/{self.feature_path(feature)}"

    def cache_file(self, feature: Feature | str) -> Path:
        return self.cache_dir.joinpath(*self.feature_path(feature).split("/")).with_suffix(".json")

    def cached(self, feature: Feature | str) -> dict | None:
        """The stored API response, or None (also for an unreadable file, which is refetched)."""
        try:
            return json.loads(self.cache_file(feature).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def fetch(self, feature: Feature | str) -> dict | None:
        """GET one feature and cache it; None when it is not there or the network is down."""
        if self.offline:
            return None
        req = urllib.request.Request(self.url(feature), headers={
            "Accept": "application/json", "User-Agent": "refusalscope"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:  # the server answered: this feature only
            warnings.warn(f"Neuronpedia has no data for {Feature.of(feature).id} (HTTP {err.code})", stacklevel=3)
            return None
        except (urllib.error.URLError, OSError) as err:  # no route: stop asking
            self.offline = True
            self.offline_reason = f"Neuronpedia unreachable ({getattr(err, 'reason', err)})"
            return None
        except ValueError:
            warnings.warn(f"Neuronpedia answered {Feature.of(feature).id} with invalid JSON", stacklevel=3)
            return None
        path = self.cache_file(feature)

        def write(tmp):
            Path(tmp).write_text(json.dumps(data), encoding="utf-8")
        atomic_write(path, write)
        return data

    def explain(self, features: Iterable[Feature], quiet: bool = True,
                workers: int = 8) -> tuple[dict[str, str], list[str]]:
        """(feature -> explanation, features with none): the cache first, then the API for the
        rest when online, `workers` requests at a time (tens of thousands of latents at the
        paper's width; one by one that is hours). The first request goes alone, so a machine
        without a route learns it from one failure and answers the rest from the cache."""
        explanations: dict[str, str] = {}
        feats = FeatureSet(features).sorted().ids()
        todo = []
        for f in feats:
            text = parse_explanation(self.cached(f))
            if text is None:
                todo.append(f)
            else:
                explanations[f] = text
        fetched: dict[str, str | None] = {}
        if todo and not self.offline:
            fetched[todo[0]] = parse_explanation(self.fetch(todo[0]))
            rest = todo[1:]
            if rest and not self.offline:
                with ThreadPoolExecutor(max(1, min(workers, len(rest)))) as pool:
                    answers = pool.map(self.fetch, rest)  # each skips once another found no route
                    for f, data in tqdm(zip(rest, answers), total=len(rest), desc="Neuronpedia",
                                        disable=quiet, leave=False):
                        fetched[f] = parse_explanation(data)
        missing = []
        for f in todo:
            text = fetched.get(f)
            if text is None:
                missing.append(f)
            else:
                explanations[f] = text
        if missing and self.offline:
            warnings.warn(f"{self.offline_reason}: {len(missing)} of {len(feats)} features have no "
                          f"cached explanation (cache {self.cache_dir})", stacklevel=2)
        return explanations, missing


def parse_explanation(data) -> str | None:
    """The first non-empty `explanations[i].description` of a Neuronpedia feature response."""
    if not isinstance(data, Mapping):
        return None
    exps = data.get("explanations")
    for e in exps if isinstance(exps, list) else []:
        desc = e.get("description") if isinstance(e, Mapping) else None
        if isinstance(desc, str) and desc.strip():
            return desc.strip()
    return None


def _with_bos(tokenizer, texts: Sequence[str]) -> list[str]:
    bos = tokenizer.bos_token
    return [t if not bos or t.startswith(bos) else bos + t for t in texts]


def top_activations(model: ChatModel, saes, texts: Sequence[str], features: Iterable[Feature],
                    k: int = 5, context: int = 8, batch_size: int = 8, include_bos: bool = False,
                    max_length: int | None = 512, quiet: bool = True) -> dict[str, list[dict]]:
    """Per feature, the `k` texts it fires on most, each at its strongest token:
    {text, position (token index, 0 = first), token, activation, context (`context` tokens each
    side, the token in [[ ]])}. Texts get the tokenizer's BOS unless they start with it (chat
    strings do); the BOS position is skipped unless `include_bos`, since features that fire there
    fire on every text alike."""
    if not texts:
        raise UserError("no texts to find top activations in: pass a corpus")
    tok = model.tokenizer
    by_layer = FeatureSet(features).checked(saes).by_layer()
    batch = model.encode_texts(_with_bos(tok, texts), add_special_tokens=False, max_length=max_length)
    best = {l: torch.zeros(len(texts), len(ix)) for l, ix in by_layer.items()}
    where = {l: torch.zeros(len(texts), len(ix), dtype=torch.long) for l, ix in by_layer.items()}
    for start, sub, acts in iter_feature_acts(model, saes, batch, by_layer, batch_size,
                                              "top activations", quiet):
        T = sub.input_ids.shape[1]
        pad = (T - sub.lengths).unsqueeze(1)
        skip = None
        if not include_bos and tok.bos_token_id is not None:
            first = sub.input_ids.gather(1, pad) == tok.bos_token_id
            skip = (torch.arange(T).unsqueeze(0) == pad) & first
        for l, a in acts.items():  # one layer's activations at a time
            if skip is not None:
                a = a.masked_fill(skip.unsqueeze(-1), 0.0)
            vals, cols = a.max(dim=1)
            best[l][start:start + len(sub)] = vals
            where[l][start:start + len(sub)] = cols - pad
    ids = [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)]
    out: dict[str, list[dict]] = {}
    for l, ix in by_layer.items():
        for j, i in enumerate(ix):
            vals = best[l][:, j]
            order = sorted(range(len(texts)), key=lambda t: (-float(vals[t]), t))
            out[f"{l}-{i}"] = [_example(tok, ids[t], t, int(where[l][t, j]), float(vals[t]), context)
                               for t in order[:k] if vals[t] > 0]
    return out


def _example(tok, ids: list[int], text: int, pos: int, act: float, context: int) -> dict:
    def dec(span):
        return tok.decode(span, skip_special_tokens=False)
    a, b = word_span(tok, ids, pos)
    token, word = dec(ids[pos:pos + 1]), dec(ids[a:b])
    snippet = dec(ids[max(0, a - context):a]) + f"[[{word}]]" + dec(ids[b:b + context])
    return {"text": text, "position": pos, "token": token, "word": word.strip() or word, "activation": act,
            "context": snippet}


_WORD_START = ("Ġ", "▁", " ")  # byte-level BPE / SentencePiece / plain marks of a leading space


def word_span(tok, ids: Sequence[int], pos: int, longest: int = 12) -> tuple[int, int]:
    """The tokens [a, b) of the whole word token `pos` is part of: explanations and Table 4 read
    words ("photosynthesis"), as Neuronpedia's do, not the tokenizer's pieces ("osyn"). A token
    continues the word before it when it carries no leading-space mark and both sides of the
    join are letters or digits; special tokens are words of their own."""
    special = set(tok.all_special_ids)
    raw = tok.convert_ids_to_tokens(list(ids[max(0, pos - longest):pos + longest + 1]))
    off = max(0, pos - longest)

    def text(i):
        return tok.decode([ids[i]], skip_special_tokens=False)

    def joins_left(i):
        if i <= 0 or i >= len(ids) or ids[i] in special or ids[i - 1] in special:
            return False
        if str(raw[i - off]).startswith(_WORD_START):
            return False
        return text(i)[:1].isalnum() and text(i - 1)[-1:].isalnum()

    if ids[pos] in special:
        return pos, pos + 1
    a = pos
    while a > off and pos - a < longest and joins_left(a):
        a -= 1
    b = pos + 1
    while b < min(len(ids), off + len(raw)) and b - pos <= longest and joins_left(b):
        b += 1
    return a, b


NO_EXAMPLES = "no activating examples in the corpus"  # not an explanation: never counted as terms


def activation_explanation(top: Sequence[Mapping], n_tokens: int = 3) -> str:
    """A one-line explanation from top-activating examples, for features Neuronpedia lacks."""
    if not top:
        return NO_EXAMPLES
    tokens = list(dict.fromkeys(e.get("word", e["token"]).strip() or repr(e["token"]) for e in top))[:n_tokens]
    ctx = " ".join(top[0]["context"].split())
    quoted = ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
    return f"fires on {quoted}{_CONTEXT_TAIL}{json.dumps('…' + ctx + '…', ensure_ascii=False)}"


STOPWORDS = frozenset("""
a about above across after again against all almost along also although always am among an and
another any anyone anything are around as at be because been before being below between both but
by can cannot could did do does doing done down during each either else especially etc even ever
every few for from further had has have having he her here hers herself him himself his how however
i if in including into is it its itself just least less like likely made make many may me might more
most much must my myself near neither no nor not of off often on once one only or other others our
ours ourselves out over own particular particularly per perhaps rather related relating same several
she should since so some something such than that the their theirs them themselves then there these
they this those through thus to too toward towards under until up upon us usually various very via
was we were what when where whether which while who whom whose why will with within without would yet
you your yours yourself yourselves s t
refers reference references referring term terms text texts phrase phrases word words token tokens
instance instances mention mentions mentioned occurrences occurrence presence specific context contexts
fires
""".split())


def _words(text: str) -> list[str]:
    """Words of an explanation; for refusalscope's own activation explanations only the tokens a
    latent fires on count, not the surrounding context, and special tokens never do."""
    text = re.sub(r"<\|[^|>]*\|>", " ", text.split(_CONTEXT_TAIL)[0])
    return re.findall(r"[a-z][a-z'\-]*[a-z]|[a-z]", text.lower())


def top_terms(explanations: Mapping[Feature, str], n: int = 30,
              stopwords: Iterable[str] = STOPWORDS) -> list[tuple[str, int]]:
    """The `n` most frequent content words across explanations (Table 4), ties alphabetical.
    The default stopwords also drop explanation boilerplate ("references", "terms", "phrases")."""
    stop = {w.lower() for w in stopwords}
    counts = Counter(w for text in explanations.values() if text != NO_EXAMPLES for w in _words(text or "")
                     if w not in stop and len(w) > 1)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# The appendix's concept groups; a trailing * matches any word ending.
DEFAULT_CONCEPTS: dict[str, list[str]] = {
    "Programming/code": ["programming", "program*", "code", "codes", "coding", "software", "function*",
                         "syntax", "variable*", "html", "javascript", "python", "sql", "json",
                         "script*", "api", "compil*", "debug*", "method*", "class", "latex", "markup"],
    "Punctuation": ["punctuation", "comma*", "period*", "colon*", "semicolon*", "quotation*",
                    "quote*", "parenthes*", "bracket*", "apostrophe*", "hyphen*", "dash*",
                    "exclamation*", "question mark*", "full stop*", "ellips*", "symbol*"],
    "Legal/judgement": ["legal", "law", "laws", "lawsuit*", "lawyer*", "court*", "judge*", "judgement*",
                        "judgment*", "regulat*", "legislat*", "statut*", "attorney*", "jury",
                        "verdict*", "ruling*", "rights", "compliance"],
    "Harm/violence": ["harm", "harms", "harmful", "harming", "violen*", "weapon*", "kill*", "murder*",
                      "attack*", "abus*", "danger*", "threat*", "injur*", "death*", "assault*",
                      "terror*", "bomb*", "crime*", "criminal*", "illegal", "drug*", "safety",
                      "unsafe", "self-harm", "suicid*", "explosive*", "poison*"],
    "Sexual": ["sex", "sexual*", "sexually", "explicit", "porn*", "erotic*", "nud*", "intimate"],
    "Uncertainty": ["uncertain*", "doubt*", "hesitat*", "ambigu*", "maybe", "perhaps", "possibilit*",
                    "unclear", "unsure", "hedg*", "speculat*", "tentative"],
    "Support/guidance": ["support*", "guidance", "guide*", "guiding", "help*", "advice", "advis*",
                         "assist*", "instruction*", "recommend*", "suggest*", "encourag*"],
}


def _keyword_pattern(keywords: Sequence[str]) -> re.Pattern:
    parts = [re.escape(k[:-1]) + r"[\w'-]*" if k.endswith("*") else re.escape(k) for k in keywords]
    return re.compile(r"\b(?:" + "|".join(parts) + r")\b", re.IGNORECASE)


def group_by_concepts(explanations: Mapping[Feature, str],
                      concepts: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Per concept, the features whose explanation holds one of its keywords (case-insensitive,
    whole words; "word*" matches endings); a feature may sit in several. "Misc" gets the rest."""
    concepts = DEFAULT_CONCEPTS if concepts is None else concepts
    pats = {c: _keyword_pattern(kw) for c, kw in concepts.items() if kw}
    texts = {Feature.of(f).id: t or "" for f, t in explanations.items()}
    out: dict[str, list[str]] = {c: [] for c in concepts}
    out.setdefault("Misc", [])
    for f in FeatureSet(texts).sorted().ids():
        hits = [c for c, p in pats.items() if p.search(texts[f])]
        for c in hits or ["Misc"]:
            out[c].append(f)
    return out
