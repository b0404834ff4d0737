"""SAEs loaded a layer at a time, on first use, memory-mapped where the file format allows.

The presets name SAEs for every layer (Gemma-2-2B x 65k: 26 x 65,536 x 2,304 x 2 matrices, about
15.7 GB in fp32), but Stages 1-3 read only layers 2..l* and most analyses a handful of layers. A
`LazySAESet` knows its layers (and their widths, from the file headers) without reading a weight;
a layer is read when a stage first asks for it, and `release()` drops what a finished stage held.

Gemma Scope `params.npz` files are uncompressed zip archives of .npy arrays, so each array is a
plain byte range of the file: it is memory-mapped in place (no copy when the run's dtype is the
stored one), and pages the run never touches are never read. Other layouts go through SAELens one
layer at a time. Either way JumpReLU thresholds keep the precision they are stored in: a latent is
"active" by the same comparison whatever dtype the weights are cast to for the model.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .sae_check import read_sae_header
from .sae_formats import GEMMA_SCOPE_PARAMS, gemma_scope_hook
from .saes import FeatureDictionary, SAESet

Loader = Callable[[], FeatureDictionary]
GEMMA_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def npz_array(path: Path, name: str) -> np.ndarray:
    """Member `name` of an .npz: a copy-on-write memory map when the member is stored
    uncompressed (what `np.savez` and Gemma Scope write), else read into memory."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with z.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header: name and extra-field lengths at bytes 26-29
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + n_name + n_extra)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise UserError(f"{path} member {name} holds Python objects: pass a Gemma Scope params.npz of numbers")
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran else "C")


def gemma_scope_dictionary(folder: str | os.PathLike, layer: int, device: Any = "cpu",
                           dtype: torch.dtype | None = None, hook_name: str | None = None) -> FeatureDictionary:
    """One Gemma Scope layer as a FeatureDictionary straight from its params.npz (memory-mapped),
    the same tensors SAELens's Gemma Scope loader gives; the threshold stays in its stored dtype."""
    path = Path(folder) / GEMMA_SCOPE_PARAMS
    with zipfile.ZipFile(path) as z:
        members = {n.removesuffix(".npy") for n in z.namelist()}
    arrays: dict[str, torch.Tensor] = {}
    for key in members:
        name = "W_" + key[2:] if key.startswith("w_") else key
        if name in GEMMA_KEYS or name == "scaling_factor":
            arrays[name] = torch.from_numpy(npz_array(path, key))
    missing = [k for k in GEMMA_KEYS if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: pass a Gemma Scope params.npz with W_enc, W_dec, "
                        "b_enc, b_dec and threshold")
    if "scaling_factor" in arrays and not torch.all(arrays["scaling_factor"] == 1):
        raise UserError(f"{path} has a non-unit scaling_factor, which SAELens 6 SAEs cannot apply: fold it "
                        "into the weights first")
    layer, _, hook = gemma_scope_hook(Path(folder), layer, hook_name)
    stored = arrays["W_enc"].dtype
    w = {k: arrays[k].to(device=device, dtype=dtype or stored) for k in GEMMA_KEYS[:4]}
    return FeatureDictionary(layer, hook, "jumprelu", w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"],
                             threshold=arrays["threshold"].to(device=device))


def saelens_dictionary(spec: Any, layer: int, device: Any = "cpu",
                       dtype: torch.dtype | None = None) -> FeatureDictionary:
    """One layer through SAELens, loaded in its stored dtype (registry SAEs: float32), then cast
    to `dtype` with the threshold left as stored. The SAELens object is not kept."""
    from .sae_loading import load_sae

    fd = load_sae(spec, layer=layer, device=str(device), dtype=None).features
    return fd.to(device, dtype)


class LazySAESet(SAESet):
    """layer -> FeatureDictionary, each read on first access (see the module docstring)."""

    def __init__(self, loaders: Mapping[int, Loader], d_in: Mapping[int, int] | None = None,
                 d_sae: Mapping[int, int] | None = None):
        self._loaders = {int(k): v for k, v in sorted(loaders.items())}
        self._widths = {int(k): (int((d_in or {}).get(k, 0)), int((d_sae or {}).get(k, 0))) for k in loaders}
        self._dicts: dict[int, FeatureDictionary] = {}
        self.saes: dict = {}  # no SAELens objects: the reference path uses the dictionaries' own encode

    def __getitem__(self, layer: int) -> FeatureDictionary:
        if layer not in self._dicts:
            if layer not in self._loaders:
                raise KeyError(layer)
            fd = self._loaders[layer]()
            if fd.layer != layer:
                raise UserError(f"SAE for layer {fd.layer} was filed under layer {layer}: pass it under {fd.layer}")
            self._dicts[layer] = fd
        return self._dicts[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self._loaders

    def __iter__(self) -> Iterator[int]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    @property
    def layers(self) -> list[int]:
        return list(self._loaders)

    @property
    def loaded(self) -> list[int]:
        """The layers held in memory now."""
        return sorted(self._dicts)

    def d_sae(self, layer: int) -> int:
        """Latents of `layer`'s SAE, from its header when it is not loaded."""
        return self._widths[layer][1] or self[layer].d_sae

    def release(self, keep: Any = ()) -> None:
        """Drop every loaded layer not in `keep`; a later access reads it again."""
        for layer in [l for l in self._dicts if l not in set(keep)]:
            del self._dicts[layer]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> LazySAESet:
        """A lazy set whose layers load onto `device` / into `dtype` (threshold as stored)."""
        def moved(load: Loader) -> Loader:
            return lambda: load().to(device, dtype)
        out = LazySAESet({l: moved(f) for l, f in self._loaders.items()},
                         {l: w[0] for l, w in self._widths.items()}, {l: w[1] for l, w in self._widths.items()})
        out._dicts = {l: fd.to(device, dtype) for l, fd in self._dicts.items()}
        return out

    def check_against(self, d_model: int, n_layers: int) -> None:
        """As SAESet.check_against, from the headers (no weights read)."""
        for layer in self._loaders:
            if not 0 <= layer < n_layers:
                raise UserError(f"SAE for layer {layer} is outside the model, which has {n_layers} layers "
                                f"(0-{n_layers - 1}): pass SAEs for layers 0-{n_layers - 1} only")
            d_in = self._widths[layer][0] or self[layer].d_in
            if d_in != d_model:
                raise UserError(f"SAE for layer {layer} has d_in {d_in} but model has d_model {d_model}: "
                                "pass SAEs trained on this model's residual stream")


def lazy_sae_set(specs: Mapping[int, Any], device: Any = "cpu", dtype: torch.dtype | None = None) -> LazySAESet:
    """A LazySAESet over {layer: spec}: local folders (widths read from their headers now, so a
    bad folder fails before any stage) or registry specs (read when first used)."""
    loaders: dict[int, Loader] = {}
    d_in: dict[int, int] = {}
    d_sae: dict[int, int] = {}
    for layer, spec in specs.items():
        if isinstance(spec, (str, os.PathLike)):
            head = read_sae_header(Path(spec))
            d_in[layer], d_sae[layer] = head.d_in, head.d_sae
            if head.layout == "gemma_scope":
                loaders[layer] = _bind(gemma_scope_dictionary, head.folder, layer, device, dtype)
                continue
        loaders[layer] = _bind(saelens_dictionary, spec, layer, device, dtype)
    return LazySAESet(loaders, d_in, d_sae)


def _bind(fn: Callable[..., FeatureDictionary], *args: Any) -> Loader:
    return lambda: fn(*args)
