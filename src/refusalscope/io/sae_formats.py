"""SAE file formats: readers for Gemma Scope and Llama Scope folders, the SAELens-format
writer, and builders of in-memory SAELens SAEs. The public entry points are re-exported by
`refusalscope.io.saes`.

Each reader is a SAELens disk converter, `(path, device, cfg_overrides) -> (cfg_dict, state_dict)`,
so that `SAE.load_from_disk(folder, converter=...)` builds the SAE exactly the way SAELens does.
The config dicts and weight conversions mirror SAELens's own Hugging Face loaders
(`sae_lens.loading.pretrained_sae_loaders.get_gemma_2_config_from_hf` /
`gemma_2_sae_huggingface_loader`, `get_llama_scope_config_from_hf` /
`llama_scope_sae_huggingface_loader`, SAELens 6.54): those download from the hub by repo id and
cannot read a local folder, so the local versions live here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from refusalscope.errors import UserError

if TYPE_CHECKING:
    from sae_lens import SAE

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
LLAMA_SCOPE_HPARAMS = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"

ACCEPTED_LAYOUTS = (
    f"SAELens ({SAELENS_CFG} + {SAELENS_WEIGHTS}), Gemma Scope ({GEMMA_SCOPE_PARAMS}), "
    f"Llama Scope ({LLAMA_SCOPE_HPARAMS} + {LLAMA_SCOPE_WEIGHTS})"
)

FolderFormat = Literal["saelens", "gemma_scope", "llama_scope"]

_KNOWN_FILES = {SAELENS_CFG, SAELENS_WEIGHTS, GEMMA_SCOPE_PARAMS, LLAMA_SCOPE_HPARAMS}


def resolve_folder(path: str | Path) -> Path:
    """The SAE folder for `path`; a path to one of the known files means its folder."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in _KNOWN_FILES:
        return p.parent
    if p.is_file() and p.name == "final.safetensors" and p.parent.name == "checkpoints":
        return p.parent.parent
    if not p.exists():
        raise UserError(
            f"SAE folder {p} does not exist: pass a folder in one of these layouts: {ACCEPTED_LAYOUTS}"
        )
    if not p.is_dir():
        raise UserError(
            f"SAE path {p} is not a folder: pass a folder in one of these layouts: {ACCEPTED_LAYOUTS}"
        )
    return p


def detect_format(folder: Path) -> FolderFormat:
    """Which layout a local SAE folder has, judged from the files in it."""
    if (folder / SAELENS_CFG).is_file() and (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / GEMMA_SCOPE_PARAMS).is_file():
        return "gemma_scope"
    if (folder / LLAMA_SCOPE_HPARAMS).is_file() and (folder / LLAMA_SCOPE_WEIGHTS).is_file():
        return "llama_scope"
    raise UserError(
        f"SAE folder {folder} has no recognised layout: pass a folder in one of these layouts: "
        f"{ACCEPTED_LAYOUTS}"
    )


# ---------------------------------------------------------------- Gemma Scope

_GEMMA_REPO = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)")


def _gemma_layer(folder: Path, layer: int | None) -> int:
    if layer is not None:
        return int(layer)
    match = re.search(r"layer_(\d+)", folder.as_posix())
    if match is None:
        raise UserError(
            f"cannot tell which layer the Gemma Scope SAE in {folder} reads (no layer_N in its "
            "path): pass the layer explicitly"
        )
    return int(match.group(1))


def gemma_scope_hook(folder: Path, layer: int | None, hook_name: str | None) -> tuple[int, str | None, str]:
    """(layer, model name, hook name) of a Gemma Scope folder: model and hook from a
    `gemma-scope-<size>-<pt|it>-<res|mlp|att>` part of the path when there is one, else the
    residual stream after `layer`."""
    layer = _gemma_layer(folder, layer)
    repo = _GEMMA_REPO.search(folder.as_posix())
    model_name, kind = None, "res"
    if repo is not None:
        size, variant, kind = repo.groups()
        model_name = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
    if hook_name is None:
        hook_name = {"res": f"blocks.{layer}.hook_resid_post", "mlp": f"blocks.{layer}.hook_mlp_out",
                     "att": f"blocks.{layer}.attn.hook_z"}[kind]
    return layer, model_name, hook_name


def gemma_scope_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
    *,
    layer: int | None = None,
    hook_name: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Gemma Scope `params.npz` folder -> SAELens JumpReLU cfg dict and state dict.

    d_in/d_sae come from the array shapes (SAELens takes them from the repo name); model and
    hook come from a `gemma-scope-<size>-<pt|it>-<res|mlp|att>` part of the path when there is
    one, else the hook is the residual stream after `layer`.
    """
    folder = Path(path)
    state_dict: dict[str, torch.Tensor] = {}
    with np.load(folder / GEMMA_SCOPE_PARAMS) as data:
        for key in data:
            name = "W_" + key[2:] if key.startswith("w_") else key
            state_dict[name] = torch.tensor(data[key]).to(dtype=torch.float32).to(device)
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - state_dict.keys()
    if missing:
        raise UserError(
            f"{folder / GEMMA_SCOPE_PARAMS} lacks {', '.join(sorted(missing))}: pass a Gemma Scope "
            "params.npz with W_enc, W_dec, b_enc, b_dec and threshold"
        )
    d_in, d_sae = state_dict["W_enc"].shape
    layer, model_name, hook_name = gemma_scope_hook(folder, layer, hook_name)
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "activation_fn": "relu",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "dataset_trust_remote_code": True,
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
    }
    if device is not None:
        cfg["device"] = device
    if cfg_overrides is not None:
        cfg.update(cfg_overrides)
    # Same handling of a fine-tuning scaling factor as SAELens's gemma_2 loader.
    if "scaling_factor" in state_dict:
        if torch.allclose(
            state_dict["scaling_factor"], torch.ones_like(state_dict["scaling_factor"])
        ):
            del state_dict["scaling_factor"]
            cfg["finetuning_scaling_factor"] = False
        else:
            raise UserError(
                f"{folder / GEMMA_SCOPE_PARAMS} has a non-unit scaling_factor, which SAELens 6 "
                "SAEs cannot apply: fold it into the weights first"
            )
    else:
        cfg["finetuning_scaling_factor"] = False
    return cfg, state_dict


# ---------------------------------------------------------------- Llama Scope


def _llama_hparams(folder: Path) -> dict[str, Any]:
    with open(folder / LLAMA_SCOPE_HPARAMS) as f:
        hp = json.load(f)
    need = ("d_model", "d_sae", "jump_relu_threshold")
    missing = [k for k in need if k not in hp]
    norm = hp.get("dataset_average_activation_norm")
    if not isinstance(norm, dict) or not norm.get("in"):
        missing.append("dataset_average_activation_norm.in")
    if missing:
        raise UserError(
            f"{folder / LLAMA_SCOPE_HPARAMS} lacks {', '.join(missing)}: pass a Llama Scope folder "
            "whose hyperparams.json has them"
        )
    return hp


def llama_scope_norm_scaling_factor(path: str | Path) -> float:
    """sqrt(d_model) / dataset-average input norm: what SAELens folds in for Llama Scope.

    SAELens reads the same number from its registry (`norm_scaling_factor` in
    pretrained_saes.yaml) and applies it with `SAE.fold_activation_norm_scaling_factor`.
    """
    hp = _llama_hparams(Path(path))
    return hp["d_model"] ** 0.5 / hp["dataset_average_activation_norm"]["in"]


def llama_scope_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Llama Scope folder -> SAELens JumpReLU cfg dict and state dict (norm factor NOT yet folded).

    Like SAELens, the scalar `jump_relu_threshold` is multiplied by the norm scaling factor
    here, and `normalize_activations` is "expected_average_only_in"; the caller must then call
    `sae.fold_activation_norm_scaling_factor(llama_scope_norm_scaling_factor(path))`, which
    scales W_enc up and W_dec, b_dec down (b_enc untouched), as `SAE.from_pretrained` does.
    """
    from sae_lens.loading.pretrained_sae_loaders import load_safetensors_weights
    from sae_lens.util import str_to_dtype

    folder = Path(path)
    hp = _llama_hparams(folder)
    d_in = hp["d_model"]
    norm_scaling_factor = d_in**0.5 / hp["dataset_average_activation_norm"]["in"]
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "jump_relu_threshold": hp["jump_relu_threshold"] * norm_scaling_factor,
        "d_in": d_in,
        "d_sae": hp["d_sae"],
        "dtype": "bfloat16",
        "model_name": hp.get("model_name", "meta-llama/Llama-3.1-8B"),
        "hook_name": hp.get("hook_point_in"),
        "hook_head_index": None,
        "activation_fn": "relu",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "cerebras/SlimPajama-627B",
        "context_size": 1024,
        "dataset_trust_remote_code": True,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
    }
    if device is not None:
        cfg["device"] = device
    if cfg_overrides is not None:
        cfg.update(cfg_overrides)
    loaded = load_safetensors_weights(
        folder / LLAMA_SCOPE_WEIGHTS, device=device, dtype=cfg.get("dtype")
    )
    names = ("encoder.weight", "decoder.weight", "encoder.bias", "decoder.bias")
    missing = [n for n in names if n not in loaded]
    if missing:
        raise UserError(
            f"{folder / LLAMA_SCOPE_WEIGHTS} lacks {', '.join(missing)}: pass a Llama Scope "
            "checkpoint with encoder.weight, decoder.weight, encoder.bias and decoder.bias"
        )
    state_dict = {
        "W_enc": loaded["encoder.weight"].T,
        "W_dec": loaded["decoder.weight"].T,
        "b_enc": loaded["encoder.bias"],
        "b_dec": loaded["decoder.bias"],
        "threshold": torch.ones(
            cfg["d_sae"], dtype=str_to_dtype(cfg["dtype"]), device=cfg["device"]
        )
        * cfg["jump_relu_threshold"],
    }
    return cfg, state_dict


# ---------------------------------------------------------------- SAELens format: write, build


def sae_dtype_name(dtype: torch.dtype | str) -> str:
    from sae_lens.util import dtype_to_str, str_to_dtype

    try:
        return dtype_to_str(str_to_dtype(dtype))
    except ValueError:
        raise UserError(f"unsupported SAE dtype {dtype!r}: use float32, float16 or bfloat16") from None


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Write `sae` in SAELens format (cfg.json + sae_weights.safetensors), atomically.

    cfg.json always carries this SAELens's version in metadata.sae_lens_version: an older or
    missing version makes `SAE.load_from_disk` treat the folder as legacy and drop the metadata.
    """
    import sae_lens
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot save SAE to {folder}: it is a file; pass a folder path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        state = dict(sae.state_dict())
        if hasattr(sae, "process_state_dict_for_saving_inference"):
            sae.process_state_dict_for_saving_inference(state)
            cfg = sae.cfg.get_inference_sae_cfg_dict()
        else:
            sae.process_state_dict_for_saving(state)
            cfg = sae.cfg.to_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, tmp / SAELENS_WEIGHTS)
        metadata = dict(cfg.get("metadata") or {})
        metadata["sae_lens_version"] = sae_lens.__version__
        metadata.setdefault("hook_name", None)
        metadata.setdefault("model_name", None)
        cfg["metadata"] = metadata
        with open(tmp / SAELENS_CFG, "w") as f:
            json.dump(cfg, f, indent=2, default=str)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _build(cls_name: str, cfg_kwargs: dict[str, Any], tensors: dict[str, torch.Tensor],
           hook_name: str, model_name: str | None, dtype: Any, device: Any) -> SAE:
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    W_enc = torch.as_tensor(tensors["W_enc"])
    dtype = dtype or W_enc.dtype
    device = torch.device(device) if device is not None else W_enc.device
    d_in, d_sae = W_enc.shape
    config_cls = getattr(sae_lens, cls_name + "Config")
    cfg = config_cls(
        d_in=int(d_in), d_sae=int(d_sae), dtype=sae_dtype_name(dtype), device=str(device),
        metadata=SAEMetadata(hook_name=hook_name, model_name=model_name), **cfg_kwargs,
    )
    sae = getattr(sae_lens, cls_name)(cfg)
    state = {k: torch.as_tensor(v).detach().to(device=device, dtype=sae.dtype).clone()
             for k, v in tensors.items()}
    try:
        sae.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:2])
        raise UserError(
            f"SAE weights do not fit together ({detail}): pass W_enc [d_in, d_sae], "
            "W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]"
        ) from None
    return sae


def make_jumprelu_sae(W_enc, W_dec, b_enc, b_dec, threshold, hook_name: str,
                      model_name: str | None = None, *, apply_b_dec_to_input: bool = False,
                      dtype: torch.dtype | None = None, device: Any = None) -> SAE:
    """An in-memory SAELens JumpReLUSAE from weights (threshold plain, not log)."""
    tensors = dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    return _build("JumpReLUSAE", {"apply_b_dec_to_input": apply_b_dec_to_input}, tensors,
                  hook_name, model_name, dtype, device)


def make_topk_sae(W_enc, W_dec, b_enc, b_dec, k: int, hook_name: str,
                  model_name: str | None = None, *, apply_b_dec_to_input: bool = False,
                  rescale_acts_by_decoder_norm: bool = False,
                  dtype: torch.dtype | None = None, device: Any = None) -> SAE:
    """An in-memory SAELens TopKSAE from weights."""
    kwargs = {"k": int(k), "apply_b_dec_to_input": apply_b_dec_to_input,
              "rescale_acts_by_decoder_norm": rescale_acts_by_decoder_norm}
    return _build("TopKSAE", kwargs, dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec),
                  hook_name, model_name, dtype, device)


def make_relu_sae(W_enc, W_dec, b_enc, b_dec, hook_name: str, model_name: str | None = None, *,
                  apply_b_dec_to_input: bool = False, dtype: torch.dtype | None = None,
                  device: Any = None) -> SAE:
    """An in-memory SAELens StandardSAE (ReLU) from weights."""
    return _build("StandardSAE", {"apply_b_dec_to_input": apply_b_dec_to_input},
                  dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec),
                  hook_name, model_name, dtype, device)
