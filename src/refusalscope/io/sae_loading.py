"""Loading SAEs: SAELens registry ids, local SAELens folders, Gemma Scope `params.npz` and Llama
Scope `checkpoints/final.safetensors` folders, one or many layers at once."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from tqdm.auto import tqdm

from refusalscope.errors import UserError
from refusalscope.io.sae_check import read_sae_header
from refusalscope.io.sae_formats import (
    gemma_scope_disk_loader,
    llama_scope_disk_loader,
    llama_scope_norm_scaling_factor,
    resolve_folder,
    sae_dtype_name,
)
from refusalscope.io.saes import FeatureDictionary, SAESet

if TYPE_CHECKING:
    from sae_lens import SAE


class LoadedSAE(NamedTuple):
    sae: SAE
    features: FeatureDictionary


def _spec_fields(spec: Any) -> dict[str, Any] | None:
    """release/sae_id or path of a dict-like or attribute-carrying spec (e.g. a config model)."""
    if isinstance(spec, Mapping):
        get = spec.get
    else:
        def get(name: str, default: Any = None) -> Any:
            return getattr(spec, name, default)
    if get("release") is not None:
        if get("sae_id") is None:
            raise UserError(f"SAE spec {spec!r} has a release but no sae_id: pass both")
        return {"release": str(get("release")), "sae_id": str(get("sae_id"))}
    for key in ("path", "folder"):
        if get(key) is not None:
            return {"path": get(key)}
    return None


def _is_offline_error(exc: BaseException) -> bool:
    kinds: list[type] = [ConnectionError, TimeoutError]
    for mod, names in (
        ("huggingface_hub.errors", ("LocalEntryNotFoundError", "OfflineModeIsEnabled")),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(mod)
            kinds += [getattr(module, n) for n in names if hasattr(module, n)]
        except ImportError:
            pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, tuple(kinds)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _from_pretrained(release: str, sae_id: str, device: str, dtype: str | None) -> SAE:
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except Exception as exc:
        if _is_offline_error(exc):
            raise UserError(
                f"could not download SAE {release} / {sae_id} from the Hugging Face hub "
                f"({type(exc).__name__}): download it where there is network (e.g. "
                "SAE.from_pretrained(...).save_model(folder), or the Gemma Scope / Llama Scope "
                "files) and pass the local folder"
            ) from exc
        if isinstance(exc, ValueError) and "not found" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise UserError(
                f"unknown SAE {release} / {sae_id} ({first}): pass a release and sae_id from "
                "the SAELens registry"
            ) from exc
        raise


def _from_folder(
    path: Any, layer: int | None, hook_name: str | None, device: str, dtype: str | None
) -> SAE:
    from sae_lens import SAE

    folder = resolve_folder(path)
    fmt = read_sae_header(folder).layout  # a damaged or incomplete folder is a one-line error
    if fmt == "saelens":
        return SAE.load_from_disk(folder, device=device, dtype=dtype)
    if fmt == "gemma_scope":
        converter = partial(gemma_scope_disk_loader, layer=layer, hook_name=hook_name)
        return SAE.load_from_disk(folder, device=device, dtype=dtype, converter=converter)
    sae = SAE.load_from_disk(folder, device=device, dtype=dtype, converter=llama_scope_disk_loader)
    sae.fold_activation_norm_scaling_factor(llama_scope_norm_scaling_factor(folder))
    return sae


def load_sae(
    spec: Any,
    layer: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    *,
    hook_name: str | None = None,
) -> LoadedSAE:
    """Load one SAE and its FeatureDictionary.

    `spec` is {release, sae_id} (dict or object, SAELens registry; needs network), a local
    folder (SAELens, Gemma Scope or Llama Scope layout, detected from its files), {path: ...},
    or an SAELens SAE object. `hook_name` overrides the hook the SAE is said to read. dtype
    None: as stored (registry SAEs: float32).
    """
    from sae_lens import SAE

    dtype_s = sae_dtype_name(dtype) if dtype is not None else None
    if isinstance(spec, SAE):
        sae = spec.to(device=device, dtype=getattr(torch, dtype_s)) if dtype_s else spec.to(device=device)
    elif isinstance(spec, (str, os.PathLike)):
        sae = _from_folder(spec, layer, hook_name, device, dtype_s)
    else:
        fields = _spec_fields(spec)
        if fields is None:
            raise UserError(
                f"cannot load an SAE from {spec!r}: pass a local folder or a release and sae_id"
            )
        if "release" in fields:
            sae = _from_pretrained(fields["release"], fields["sae_id"], device, dtype_s)
        else:
            sae = _from_folder(fields["path"], layer, hook_name, device, dtype_s)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    return LoadedSAE(sae, FeatureDictionary.from_sae(sae, layer))


def _fill(template: Any, layer: int) -> Any:
    if isinstance(template, (str, os.PathLike)):
        return str(template).replace("{layer}", str(layer))
    fields = _spec_fields(template)
    if fields is None:
        raise UserError(
            f"cannot load SAEs from {template!r}: pass a folder template with {{layer}}, a "
            "release and sae_id template, or a mapping layer -> spec"
        )
    return {k: str(v).replace("{layer}", str(layer)) for k, v in fields.items()}


def expand_specs(specs: Any, layers: Any) -> dict[int, Any]:
    is_table = isinstance(specs, Mapping) and _spec_fields(specs) is None and all(
        isinstance(k, int) or str(k).isdigit() for k in specs
    )
    if is_table:
        table = {int(k): v for k, v in specs.items()}
        if layers is None:
            return dict(sorted(table.items()))
        missing = [L for L in layers if int(L) not in table]
        if missing:
            raise UserError(
                f"no SAE given for layer(s) {', '.join(map(str, missing))}: add them or drop "
                "them from layers"
            )
        return {int(L): table[int(L)] for L in sorted(set(map(int, layers)))}
    if layers is None:
        raise UserError("an SAE template needs the layers to load: pass layers=[...]")
    layers = sorted(set(map(int, layers)))
    text = str(specs) if isinstance(specs, (str, os.PathLike)) else str(_spec_fields(specs) or {})
    if "{layer}" not in text and len(layers) > 1:
        raise UserError(
            f"SAE spec {specs!r} has no {{layer}} placeholder but {len(layers)} layers were asked "
            "for: put {layer} where the layer number goes"
        )
    return {L: _fill(specs, L) for L in layers}


def load_sae_set(
    specs: Any,
    layers: Any = None,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    quiet: bool = False,
) -> SAESet:
    """Load SAEs for many layers: `specs` is {layer: spec}, a folder template with "{layer}", or
    {release, sae_id} with "{layer}" in sae_id (e.g. "layer_{layer}/width_16k/canonical")."""
    per_layer = expand_specs(specs, layers)
    dicts: dict[int, FeatureDictionary] = {}
    saes: dict[int, SAE] = {}
    for layer, spec in tqdm(per_layer.items(), desc="Loading SAEs", unit="layer", disable=quiet):
        sae, fd = load_sae(spec, layer=layer, device=device, dtype=dtype)
        dicts[layer], saes[layer] = fd, sae
    return SAESet(dicts, saes)
