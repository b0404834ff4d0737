"""One YAML config per run, validated by pydantic; unknown keys are rejected with the key named.

Presets (`run/presets/*.yaml`) hold the paper's setups and the demo world; a user file may name
a preset under `preset:` and override any field.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError


class Section(BaseModel):
    # defaults are validated too, so a default [2, 4] of list[float] is [2.0, 4.0], as the same
    # values read back from a saved config.yaml are: the stage hashes of both agree
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# Constrained items: the error names the key and the offending position (e.g. 'stage2.taus.1').
def _tau(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"τ = {v} is outside (0, 1]: use thresholds above 0 and at most 1")
    return v


Tau = Annotated[float, AfterValidator(_tau)]
Positive = Annotated[int, Field(ge=1)]
Layer = Annotated[int, Field(ge=0)]
BackPosition = Annotated[int, Field(le=-1)]
NonEmpty = Field(min_length=1)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _judge_name(v: str | None) -> str | None:
    """A judge name from the registry (measures.judges), checked when the config is read."""
    from ..measures.judges import judge_names

    if v is not None and v not in judge_names():
        raise ValueError(f"unknown judge {v!r}: use one of {', '.join(judge_names())}")
    return v


JudgeName = Annotated[str, AfterValidator(_judge_name)]


class ModelConfig(Section):
    source: str = Field("demo", description="'demo', a HuggingFace hub id, a local folder or a .gguf file")
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps (checked against this machine's devices)")
    system_prompt: str | None = Field(None, description="None keeps the chat template's default")
    refusal_tokens: list[str] = Field(["I"], min_length=1)
    batch_size: int = Field(16, ge=1)
    chat_template: str | None = Field(None, description="Jinja chat template (or a file holding one) for models without one")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code (off: never by default)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N, mps: fix model.device")
        return v


class SAEConfig(Section):
    source: Literal["demo", "release", "local"] = "demo"
    release: str | None = None
    sae_id: str | None = Field(None, description="template with {layer}, e.g. layer_{layer}/width_16k/canonical")
    path: str | None = Field(None, description="local folder template with {layer}")
    layers: Annotated[list[Layer], NonEmpty] | Literal["all"] = "all"
    neuronpedia_id: str | None = Field(None, description="template, e.g. gemma-2-2b/{layer}-gemmascope-res-16k")


class DataConfig(Section):
    harmful_train: str = "bundled:harmful:train"
    harmful_val: str = "bundled:harmful:val"
    harmful_test: str = "bundled:harmful:test"
    harmless_train: str = "bundled:harmless:train"
    harmless_val: str = "bundled:harmless:val"
    harmless_test: str = "bundled:harmless:test"
    text_field: str | None = None
    max_prompts: int | None = Field(None, ge=1, description="cap on harmful test prompts analysed")
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "share of the refused harmful test prompts held out of Stages 1-3 (seeded, per category) and "
        "only evaluated by `refusalscope eval`; 0: none (the paper has no held-out set)"))


class JudgeConfig(Section):
    name: JudgeName = Field("substring", description="substring, first-token, classifier (the paper's HarmBench classifier), …")
    options: dict[str, Any] = {}
    degenerate_is_jailbreak: bool = Field(
        False, description="paper: degenerate replies are not jailbreaks; set True to count them")
    first_pass: JudgeName | None = Field(
        None, description="cheap judge run first (e.g. 'opening'): it may only call a reply refused; "
                          "every other reply, and so every jailbreak, is decided by `name`")
    first_pass_options: dict[str, Any] = {}
    first_pass_tokens: int | None = Field(
        None, ge=1, description="tokens generated for the first pass; only replies it passes on are "
                                "generated to generation.max_new_tokens (None: one full generation)")


class GenerationConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)


class DirectionConfig(Section):
    positions: list[BackPosition] = Field([-1], min_length=1,
                                          description="post-instruction positions, counted back from the last token (-1, -2, ...)")
    layers: Annotated[list[Layer], NonEmpty] | Literal["auto"] = Field("auto", description="candidate layers; auto: 1 .. 0.8·n_layers")
    n_train: int | None = Field(None, ge=2, description="cap on train prompts per class")
    n_val: int = Field(32, ge=2)
    max_kl: float = Field(0.1, gt=0, description="KL(plain || ablated) on harmless prompts allowed")
    refused_only: bool = Field(
        True, description="paper: r is the difference between prompts that elicit refusal and benign "
                          "ones, so harmful train prompts the judge does not call refused are dropped")
    n_generate: int = Field(4, ge=1, description="candidates checked by generation + judge")
    random_controls: int = Field(3, ge=0, description="random directions ablated as a control")


class Stage1Config(Section):
    layers: Literal["to_lstar", "all"] | list[Layer] = Field(
        "to_lstar", description="candidate layers: to_lstar = SAE layers up to l* (the paper's Stage 3 "
                                "and human study draw from layers 2..l*), all = every SAE layer")
    exclude_layers: list[Layer] = Field([0, 1], description="paper: early layers carry grammar")
    k_start: int = Field(10, ge=1)
    k_step: int = Field(10, ge=1)
    k_max: int = Field(200, ge=1)
    positions: Literal["all", "prompt"] = "all"
    rungs_per_round: int = Field(3, ge=1, description="K rungs generated together per round")

    @model_validator(mode="after")
    def _ladder(self):
        if self.k_max < self.k_start:
            raise ValueError(f"k_max ({self.k_max}) is below k_start ({self.k_start}): raise k_max or lower k_start")
        return self


class Stage2Config(Section):
    block_size: int = Field(5, ge=1, description="N of Algorithm 1")
    taus: list[Tau] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], min_length=1,
                            description="consensus thresholds τ of Algorithm 1, each in (0, 1]")
    seeds: list[Annotated[int, Field(ge=0)]] = Field([0, 1, 2], min_length=1)
    batch_size: int = Field(32, ge=1, description="rows per forward pass")
    unbroken: Literal["skip", "k_max"] = Field(
        "skip", description="prompts Stage 1 did not jailbreak: skip them, or prune the k_max pool "
                            "(the paper's Llama setup: one step K = 10, whose ablation degenerates)")


class Stage3Config(Section):
    harmful: list[str] = Field(["bundled:harmful"], min_length=1, description="prompt sets labelled 1 (paper: AdvBench)")
    harmless: list[str] = Field(["bundled:harmless"], min_length=1, description="prompt sets labelled 0 (paper: Alpaca)")
    n_per_class: int | None = Field(None, ge=4, description="cap per label (equal numbers are used)")
    layers: Annotated[list[Layer], NonEmpty] | Literal["auto"] = Field("auto", description="auto: SAE layers from 2 to l*")
    n_tokens: int = Field(4, ge=1, description="last tokens recorded (the post-instruction template)")
    mode: Literal["tokens", "pooled"] = Field(
        "tokens", description="tokens: one FM row per recorded token (the paper records the last 4 "
                              "tokens); pooled: one row per prompt, the max over those tokens")
    scale: Literal["max_abs", "none"] = Field(
        "max_abs", description="FM inputs divided per column by their train max |x| (not in the paper; "
                               "raw activations make x_i·x_j explode), or raw")
    embedding_size: int = Field(20, ge=1)
    collapse_sizes: list[Positive] = Field([5, 50], description="the paper's other FM sizes, trained for the collapse check")
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    ranking: Literal["per_prompt", "global"] = Field(
        "per_prompt", description="per_prompt: each prompt's latents ranked against its own Stage 2 set; "
                                  "global: one ranking against the union of every prompt's Stage 2 latents")
    aggregate: Literal["mean", "max"] = Field(
        "mean", description="similarity to a Stage 2 set: mean cosine, or the cosine to its closest latent")
    min_support: int = Field(
        1, ge=1, description="train rows a latent must be non-zero in to be ranked. Only latents seen in >= 1 "
                             "train row are FM columns at all (an unseen one would keep its random embedding); "
                             "1 ranks every latent the FM trained, as the paper ranks all; raise it to drop "
                             "rarely seen latents, whose few updates leave their embedding noisy")
    ks: list[Positive] = Field(list(range(100, 2001, 100)), min_length=1)
    probe_ks: list[Positive] = Field([100, 500, 1000, 2000], min_length=1)
    rungs_per_round: int = Field(3, ge=1)


AnalysisName = Literal["hydra", "stage3_only", "controls", "ce_loss", "taxonomy", "clamping", "semantics"]
ANALYSES: tuple[AnalysisName, ...] = get_args(AnalysisName)


class AnalysesConfig(Section):
    run: list[AnalysisName] = list(ANALYSES)
    wake_threshold: float = Field(0.1, ge=0, description="relative P(I) change that keeps a prompt (hydra step 2)")
    random_seeds: list[Annotated[int, Field(ge=0)]] = Field([0, 1, 2], min_length=1)
    obrien_ks: list[Positive] = Field([1, 2, 3, 4, 5, 6, 8, 10], min_length=1)
    ce_instructions: str = Field("bundled:harmless:test", description="paper: Alpaca")
    ce_general: str = Field("bundled:general", description="paper: The Pile")
    ce_texts: int = Field(100, ge=1)
    ce_sets: int | None = Field(100, ge=1, description=(
        "per-prompt Stage 2 sets whose CE is averaged: a seeded sample of at most this many (default 100: "
        "100 sets × ce_texts × 2 datasets forward rows; None: all). The result says how many of how many"))
    taxonomy_prompts: list[str] = Field(["bundled:harmful"], min_length=1, description="prompts with unsafe categories (paper: CoCoNot)")
    taxonomy_field: Literal["category", "subcategory"] = Field(
        "category", description="the prompt field holding the harm type (CoCoNot: subcategory)")
    taxonomy_only: str | None = Field(
        None, description="keep prompts whose category is this (CoCoNot: 'Requests with safety concerns')")
    taxonomy_sinks: Literal["keep", "skip"] = Field(
        "keep", description="keep: a latent is active on a category if non-zero on any token, BOS "
                            "included (the paper); skip: high-norm sink positions ignored. The other "
                            "view is always reported beside it")
    clamp_values: list[float] = Field([2, 4, 6, 8, 10], min_length=1)
    clamp_prompts: list[str] | None = Field(None, description="None: the paper's five benign prompts")
    clamp_tokens: int = Field(24, ge=1)
    explain_texts: int = Field(200, ge=1, description="corpus texts searched for top activations")
    neuronpedia_cache: str | None = Field(None, description="folder of cached explanations (default: user cache)")
    neuronpedia_url: str = Field("https://www.neuronpedia.org", description="Neuronpedia server (or a self-hosted one)")
    neuronpedia_bundle: str | None = Field(None, description=(
        "Neuronpedia explanations export read offline before the API: an explanations/*.jsonl.gz file or a folder "
        "of them (rows of other models or SAEs are skipped when saes.neuronpedia_id is set)"))


class DashboardsConfig(Section):
    """Latent dashboards for the report and web app (stage `dashboards`, after the analyses)."""

    run: bool = Field(True, description="compute them with the analyses (report and web app read them)")
    corpus: list[str] = Field(["bundled:general"], description="texts searched for top contexts, plus the refused prompts")
    texts: int = Field(200, ge=1, description="corpus texts in all (up to half of them the refused prompts)")
    max_length: int = Field(128, ge=8, description="tokens per corpus text")
    stage1: bool = Field(True, description="also Stage 1 candidates (top-K per layer), not only Stage 2/3 sets")
    top_k: int = Field(10, ge=1, description="top-activating contexts per latent")
    quantile_bands: int = Field(3, ge=0)
    per_band: int = Field(2, ge=1, description="samples per quantile band")
    context_left: int = Field(12, ge=0)
    context_right: int = Field(4, ge=0)
    bins: int = Field(30, ge=2, description="histogram bins of non-zero activations")
    logit_tokens: int = Field(10, ge=1)
    fm_neighbours: int = Field(10, ge=1)
    effect_prompts: int | None = Field(5, ge=1, description="prompts per latent for ΔP('I') when ablated alone (None: all)")
    sink_ratio: float | None = Field(4.0, gt=1, description="residual norm / row median that marks an attention sink")


EvalInterventionName = Literal["none", "direction", "actadd", "core", "core_category", "stage2_union",
                               "critical_union", "random", "bos_clamp"]
EVAL_INTERVENTIONS: tuple[EvalInterventionName, ...] = get_args(EvalInterventionName)


class EvalConfig(Section):
    """`refusalscope eval`: interventions (rows) × datasets (columns); not part of `run`."""

    interventions: list[EvalInterventionName] = Field(list(EVAL_INTERVENTIONS), description=(
        "none; direction (ablated at every layer); actadd (r added at l*); core (the N latents most often "
        "in Stage 2 sets, N in core_sizes); core_category (the same per unsafe category); stage2_union; "
        "critical_union (Stage 2 + Stage 3 sets); random (active latents matched to each core set in count "
        "and layer mix); bos_clamp (woken hydra latents clamped at BOS)"))
    datasets: list[str] = Field(["heldout", "harmless", "bundled:overrefusal", "general"], description=(
        "heldout / search (the run's refused prompts held out of / dissected by Stages 1-3), harmless "
        "(data.harmless_test), general (CE on general_text), or a prompt set (bundled:NAME or a file; "
        "NAME=PATH names it); a label column splits refusal (unsafe) from over-refusal (safe)"))
    core_sizes: list[int] = Field([5, 10, 20, 50], description="N of the core sets")
    category_core_size: int = Field(10, ge=1, description="N of each category's core set")
    category_min_sets: int = Field(2, ge=1, description="Stage 2 sets a category needs for a core set")
    random_seeds: list[int] = [0, 1, 2]
    clamp_values: list[float] = Field([8.0], description="values the woken latents are clamped to at BOS")
    positions: Literal["all", "prompt"] = Field("all", description="where latents are ablated (paper: all)")
    max_prompts: int | None = Field(None, ge=1, description="cap per prompt dataset (a seeded draw)")
    max_new_tokens: int | None = Field(None, ge=1, description="reply length judged (None: generation.max_new_tokens)")
    general_text: str = Field("bundled:general", description="texts for cross-entropy (paper: The Pile)")
    ce_texts: int = Field(100, ge=1)
    harmless_judge: JudgeName | None = Field(None, description=(
        "judge of replies to harmless prompts (over-refusal); None: the run's judge, or substring when "
        "that judge decides harm rather than refusal (classifier, llama-guard)"))


class ExecutionConfig(Section):
    """Where per-prompt work runs. Not part of any stage hash: both backends give the same results."""

    backend: Literal["local", "ray"] = Field("local", description="ray: fan prompts out over Ray workers")
    address: str | None = Field(None, description="existing Ray cluster (ray://host:port or 'auto'); None: start a local one")
    workers: int | None = Field(None, ge=1, description="model replicas (None: one per GPU, else one per cpus_per_worker CPUs)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per CPU worker")
    shard_size: int = Field(8, ge=1, description="prompts per work item: the unit of batching, fan-out and checkpoints")
    memory_check: bool = Field(True, description="stop before the first stage when the estimated memory need "
                                                  "(model, SAEs, judge, largest batch) exceeds the device's free memory")
    compile: bool = Field(False, description="torch.compile the decoder layers for forward passes (GPU: ~4x faster "
                                             "P('I') passes at batch 16, ~15 s to compile; same results)")


class Config(Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    saes: SAEConfig = SAEConfig()
    data: DataConfig = DataConfig()
    judge: JudgeConfig = JudgeConfig()
    generation: GenerationConfig = GenerationConfig()
    direction: DirectionConfig = DirectionConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    analyses: AnalysesConfig = AnalysesConfig()
    dashboards: DashboardsConfig = DashboardsConfig()
    eval: EvalConfig = EvalConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("name must be a non-empty string without '/': fix the name")
        return v

    def section(self, *names: str) -> dict:
        """The named sections as plain data, for stage config hashes."""
        return {n: getattr(self, n).model_dump() if isinstance(getattr(self, n), BaseModel)
                else getattr(self, n) for n in names}


def preset_names() -> list[str]:
    folder = resources.files("refusalscope") / "run" / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return (resources.files("refusalscope") / "run" / "presets" / f"{name}.yaml").read_text()


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section. A judge section that names another judge
    replaces the base's whole judge section: its options and first pass were written for the
    judge it named (a classifier's `path` means nothing to first-token)."""
    out = dict(base)
    for k, v in over.items():
        if k == "judge" and isinstance(v, dict) and isinstance(out.get(k), dict) \
                and v.get("name", out[k].get("name")) != out[k].get("name"):
            out[k] = v
        else:
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(err: ValidationError, origin: str) -> str:
    e = err.errors()[0]
    # a union's branch name (e.g. 'list[...]' of "layers: list | 'all'") is no key: drop it
    where = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("literal"))))
    if e["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{where}': remove it or check its spelling"
    if e["type"] == "value_error":  # our validators' messages say what to do
        return f"{origin}: '{where}': {e['msg'].removeprefix('Value error, ')}"
    if e["type"] == "too_short":
        return f"{origin}: '{where}': the list is empty: give at least one value"
    return f"{origin}: '{where}': {e['msg']} (got {e.get('input')!r}): fix this value"


def _expand_preset(data: dict, seen: tuple[str, ...] = ()) -> dict:
    """`data` on top of the preset it names (presets may name a preset themselves)."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    if not preset:
        return data
    if preset in seen:
        raise UserError(f"preset {preset!r} names itself through {' -> '.join(seen)}: break the cycle")
    return _merge(_expand_preset(yaml.safe_load(preset_text(preset)) or {}, (*seen, preset)), data)


def config_from_dict(data: dict, origin: str = "config") -> Config:
    data = _expand_preset(data)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err, origin)) from None


def load_config(path_or_preset: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """A config from a YAML file, a preset name, or the demo preset when None."""
    if path_or_preset is None:
        path_or_preset = "demo"
    p = Path(path_or_preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"config file {p} not found: pass a YAML file or one of the presets "
                            f"({', '.join(preset_names())})")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UserError(f"{p}: not valid YAML ({str(err).splitlines()[0]}): fix the syntax") from None
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"{p}: cannot be read as UTF-8 text ({type(err).__name__}): re-save it as UTF-8") from None
        if data is None:
            raise UserError(f"{p}: the config file is empty: write the settings to change (e.g. preset: demo), "
                            "or pass a preset name with -c")
        if not isinstance(data, dict):
            raise UserError(f"{p}: the top level must be a mapping of sections: fix the file")
        origin = str(p)
    else:
        data, origin = {"preset": str(path_or_preset)}, f"preset {path_or_preset}"
    return config_from_dict(_merge(data, overrides or {}), origin)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
