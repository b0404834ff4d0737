"""An SAE folder checked from its headers alone (config JSON, safetensors or .npy headers, file
sizes), without reading its weights: the layout, architecture, d_in, d_sae and the layer it reads,
and whether its weights file is whole. A wrong, damaged or mismatched SAE is then a one-line error
before any stage runs, not a traceback hours in."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .sae_formats import (
    GEMMA_SCOPE_PARAMS,
    LLAMA_SCOPE_HPARAMS,
    LLAMA_SCOPE_WEIGHTS,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    detect_format,
    resolve_folder,
)

SUPPORTED = ("jumprelu", "topk", "standard")  # what FeatureDictionary.from_sae reads


@dataclass(frozen=True)
class SAEHeader:
    folder: Path
    layout: str
    architecture: str
    d_in: int
    d_sae: int
    hook_layer: int | None  # the layer its hook name says it reads, when it says


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}): copy or download the SAE again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object: copy or download the SAE again")
    return data


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header; a short or garbled file is a one-line error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise UserError(f"{path} is not a safetensors file (bad header): copy or download it again")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path} is not a safetensors file (bad header): copy or download it again") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    if size < 8 + n + end:
        raise UserError(f"{path} is truncated ({size} of {8 + n + end} bytes): copy or download it again")
    return {k: v["shape"] for k, v in entries.items()}


def _npz_shape(path: Path, name: str) -> list[int]:
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            shape, _, _ = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)
            bad = z.testzip()
    except KeyError:
        raise UserError(f"{path} has no {name}: pass a Gemma Scope params.npz with W_enc, W_dec, b_enc, b_dec "
                        "and threshold") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise UserError(f"{path} is not a readable params.npz ({type(err).__name__}): copy or download it "
                        "again") from None
    if bad is not None:
        raise UserError(f"{path} is damaged (member {bad}): copy or download it again")
    return list(shape)


def _layer_of(hook_name: str | None) -> int | None:
    match = re.search(r"\.(\d+)(?:\.|$)", hook_name or "")
    return int(match.group(1)) if match else None


def read_sae_header(path: str | Path) -> SAEHeader:
    folder = resolve_folder(path)
    layout = detect_format(folder)
    if layout == "saelens":
        cfg = _json(folder / SAELENS_CFG)
        missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
        if missing:
            raise UserError(f"{folder / SAELENS_CFG} lacks {', '.join(missing)}: pass a complete SAELens cfg.json "
                            "(save the SAE again with SAELens)")
        arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
        from sae_lens.registry import SAE_CLASS_REGISTRY

        if arch not in SAE_CLASS_REGISTRY:
            raise UserError(f"{folder / SAELENS_CFG} names an unknown SAE architecture {arch!r}: use one of "
                            f"{', '.join(SUPPORTED)} (SAELens's own)")
        if arch not in SUPPORTED:
            raise UserError(f"SAE architecture {arch!r} in {folder} is not supported: pass a JumpReLU, TopK or "
                            "standard (ReLU) SAE")
        shapes = safetensors_shapes(folder / SAELENS_WEIGHTS)
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]
        if shapes.get("W_enc", [d_in, d_sae]) != [d_in, d_sae]:
            raise UserError(f"{folder / SAELENS_WEIGHTS} holds W_enc {shapes['W_enc']}, but cfg.json says d_in "
                            f"{d_in}, d_sae {d_sae}: the two files do not belong together; save the SAE again")
        return SAEHeader(folder, layout, arch, d_in, d_sae, _layer_of(hook))
    if layout == "gemma_scope":
        d_in, d_sae = _npz_shape(folder / GEMMA_SCOPE_PARAMS, "W_enc")
        return SAEHeader(folder, layout, "jumprelu", d_in, d_sae, None)
    hp = _json(folder / LLAMA_SCOPE_HPARAMS)
    missing = [k for k in ("d_model", "d_sae") if not isinstance(hp.get(k), int)]
    if missing:
        raise UserError(f"{folder / LLAMA_SCOPE_HPARAMS} lacks {', '.join(missing)}: pass a Llama Scope folder "
                        "whose hyperparams.json has them")
    safetensors_shapes(folder / LLAMA_SCOPE_WEIGHTS)
    return SAEHeader(folder, layout, "jumprelu", hp["d_model"], hp["d_sae"], _layer_of(hp.get("hook_point_in")))


def check_sae_folder(path: str | Path, layer: int, d_model: int | None = None, n_layers: int | None = None,
                     model_name: str = "the model") -> SAEHeader:
    """The header of the SAE for `layer`, checked against the model's width and depth."""
    h = read_sae_header(path)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UserError(f"SAE for layer {layer} is outside {model_name}, which has layers 0-{n_layers - 1}: "
                        f"pass SAEs for layers 0-{n_layers - 1} only")
    if h.hook_layer is not None and h.hook_layer != layer:
        raise UserError(f"SAE in {h.folder} reads layer {h.hook_layer} but was given for layer {layer}: check "
                        "the {layer} placeholder of saes.path")
    if d_model is not None and h.d_in != d_model:
        raise UserError(f"SAE for layer {layer} ({h.folder}) has d_in {h.d_in} but {model_name} has width "
                        f"{d_model}: pass SAEs trained on this model's residual stream")
    return h
