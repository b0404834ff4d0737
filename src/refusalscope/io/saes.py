"""SAEs: load them with SAELens (registry ids or local SAELens / Gemma Scope / Llama Scope
folders), save them in SAELens format, and view each layer as a `FeatureDictionary`.

The FeatureDictionary is the plain-tensor view the ablation engine works on; its encode/decode
reproduce SAELens's math exactly, so either can be used. SAELens is imported lazily because
`import sae_lens` costs several seconds and most users of FeatureDictionary never need it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from refusalscope.errors import UserError
from refusalscope.io.sae_formats import make_jumprelu_sae, make_relu_sae, make_topk_sae, save_sae  # noqa: F401

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = [
    "FeatureDictionary",
    "SAESet",
    "make_jumprelu_sae",
    "make_relu_sae",
    "make_topk_sae",
    "save_sae",
]

ARCHITECTURES = ("jumprelu", "topk", "relu")
_FROM_SAELENS = {"jumprelu": "jumprelu", "topk": "topk", "standard": "relu"}


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureDictionary:
    """One layer's SAE as plain tensors: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
    b_dec [d_in], threshold [d_sae] (zeros unless JumpReLU)."""

    layer: int
    hook_name: str
    architecture: str
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor
    k: int | None = None
    apply_b_dec_to_input: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"unknown SAE architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}"
            )
        d_in, d_sae = self.W_enc.shape
        shapes = {
            "W_dec": (self.W_dec.shape, (d_sae, d_in)),
            "b_enc": (self.b_enc.shape, (d_sae,)),
            "b_dec": (self.b_dec.shape, (d_in,)),
            "threshold": (self.threshold.shape, (d_sae,)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise UserError(
                    f"SAE for layer {self.layer}: {name} has shape {tuple(got)}, expected {want} "
                    f"for W_enc {(d_in, d_sae)}: pass consistent SAE weights"
                )
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise UserError(
                f"TopK SAE for layer {self.layer} has k={self.k}: pass 1 <= k <= d_sae ({d_sae})"
            )

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def pre_activations(self, h: torch.Tensor, indices: Any = None) -> torch.Tensor:
        """(h - b_dec·[apply_b_dec_to_input]) · W_enc + b_enc, for all latents or only `indices`."""
        x = h.to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if indices is None:
            return x @ self.W_enc + self.b_enc
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        return x @ self.W_enc[:, idx] + self.b_enc[idx]

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae], exactly as SAELens's `sae.encode`."""
        pre = self.pre_activations(h)
        if self.architecture == "topk":
            assert self.k is not None  # __post_init__ requires k for a TopK SAE
            values, idx = torch.topk(pre, k=self.k, dim=-1, sorted=False)
            out = torch.zeros_like(pre)
            return out.scatter_(-1, idx, values.relu())
        acts = torch.relu(pre)
        if self.architecture == "jumprelu":
            acts = acts * (pre > self.threshold).to(acts.dtype)
        return acts

    def encode_subset(self, h: torch.Tensor, indices: Any) -> torch.Tensor:
        """Activations of only the latents in `indices` (O(d_in·|S|)); exact for JumpReLU/ReLU.

        TopK membership depends on all latents, so it has no per-latent shortcut.
        """
        if self.architecture == "topk":
            raise ValueError("encode_subset needs the full encode for TopK SAEs: use encode()")
        pre = self.pre_activations(h, indices)
        acts = torch.relu(pre)
        if self.architecture == "jumprelu":
            idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
            acts = acts * (pre > self.threshold[idx]).to(acts.dtype)
        return acts

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """x̂ = f · W_dec + b_dec."""
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> FeatureDictionary:
        """A copy on `device` / in `dtype` (self when nothing changes). The threshold keeps its
        own dtype: JumpReLU compares pre-activations with it in the SAE's stored precision, so a
        latent is active or not alike in fp32 and bf16 (a threshold rounded to bf16 moves)."""
        names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
        moved = {n: getattr(self, n).to(device=device, dtype=dtype if n != "threshold" else None) for n in names}
        if all(moved[n] is getattr(self, n) for n in names):
            return self
        return dataclasses.replace(self, **moved)

    def unit_decoder(self) -> torch.Tensor:
        """W_dec with rows scaled to unit norm (for cosine similarities with directions)."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @classmethod
    def from_sae(cls, sae: SAE, layer: int | None = None) -> FeatureDictionary:
        """The view of a SAELens JumpReLUSAE / TopKSAE / StandardSAE; reads hook and layer from cfg.

        A TopK SAE with `rescale_acts_by_decoder_norm` is folded (W_enc, b_enc times the decoder
        row norms, W_dec divided by them): same activations and reconstruction as SAELens.
        """
        from sae_lens.saes.transcoder import Transcoder
        from sae_lens.util import extract_layer_from_tlens_hook_name

        cfg = sae.cfg
        sl_arch = cfg.architecture()
        if isinstance(sae, Transcoder) or sl_arch not in _FROM_SAELENS:
            raise UserError(
                f"SAE architecture {sl_arch!r} is not supported: pass a JumpReLU, TopK or "
                "standard (ReLU) SAE"
            )
        if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise UserError(
                f"SAE normalises its input at run time ({cfg.normalize_activations}), which a "
                "FeatureDictionary cannot express: pass an SAE with normalize_activations='none'"
            )
        if cfg.normalize_activations == "expected_average_only_in":
            warnings.warn(
                "SAE has normalize_activations='expected_average_only_in' but no norm scaling "
                "factor folded in; SAELens ignores it at run time, and so does refusalscope",
                stacklevel=2,
            )
        hook_name = cfg.metadata.hook_name
        hook_layer = extract_layer_from_tlens_hook_name(hook_name) if hook_name else None
        if layer is None:
            if hook_layer is None:
                raise UserError(
                    f"cannot tell which layer the SAE reads (hook {hook_name!r}): pass its layer"
                )
            layer = hook_layer
        elif hook_layer is not None and hook_layer != int(layer):
            raise UserError(
                f"SAE reads {hook_name} (layer {hook_layer}) but was given for layer {layer}: "
                f"pass it for layer {hook_layer}"
            )
        layer = int(layer)
        if not hook_name:
            hook_name = f"blocks.{layer}.hook_resid_post"
        arch = _FROM_SAELENS[sl_arch]
        W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
        b_enc, b_dec = sae.b_enc.detach(), sae.b_dec.detach()
        if arch == "jumprelu":
            threshold = sae.threshold.detach()
        else:
            threshold = torch.zeros_like(b_enc)
        k = int(cfg.k) if arch == "topk" else None
        if arch == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        return cls(
            layer=layer,
            hook_name=hook_name,
            architecture=arch,
            W_enc=W_enc,
            W_dec=W_dec,
            b_enc=b_enc,
            b_dec=b_dec,
            threshold=threshold,
            k=k,
            apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        )


class SAESet(Mapping[int, FeatureDictionary]):
    """SAEs of several layers: layer -> FeatureDictionary, plus the SAELens objects when loaded."""

    def __init__(
        self,
        dictionaries: Mapping[int, FeatureDictionary],
        saes: Mapping[int, SAE] | None = None,
    ):
        for layer, fd in dictionaries.items():
            if int(layer) != fd.layer:
                raise UserError(
                    f"SAE for layer {fd.layer} was filed under layer {layer}: pass it under {fd.layer}"
                )
        self._dicts = {int(k): v for k, v in sorted(dictionaries.items())}
        self.saes: dict[int, SAE] = {int(k): v for k, v in (saes or {}).items()}

    def __getitem__(self, layer: int) -> FeatureDictionary:
        return self._dicts[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._dicts)

    def __len__(self) -> int:
        return len(self._dicts)

    @property
    def layers(self) -> list[int]:
        return sorted(self._dicts)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> SAESet:
        """A set whose dictionaries are on `device`/`dtype` (the SAELens objects are moved in place)."""
        for sae in self.saes.values():
            sae.to(device=device, dtype=dtype)
        return SAESet({k: v.to(device, dtype) for k, v in self._dicts.items()}, self.saes)

    def check_against(self, d_model: int, n_layers: int) -> None:
        """Raise UserError unless every SAE reads a d_model-wide stream of an existing layer."""
        for layer, fd in self._dicts.items():
            if not 0 <= layer < n_layers:
                raise UserError(
                    f"SAE for layer {layer} is outside the model, which has {n_layers} layers "
                    f"(0-{n_layers - 1}): pass SAEs for layers 0-{n_layers - 1} only"
                )
            if fd.d_in != d_model:
                raise UserError(
                    f"SAE for layer {layer} has d_in {fd.d_in} but model has d_model {d_model}: "
                    "pass SAEs trained on this model's residual stream"
                )


def sae_width(saes: Mapping[int, FeatureDictionary], layer: int) -> int:
    """Latents of `layer`'s SAE. A lazy set (io/sae_lazy.py) answers from the file's header, so
    code that only counts latents (pools, offsets, index checks) never reads a layer's weights;
    any other mapping of FeatureDictionaries answers from the loaded tensors."""
    width = getattr(saes, "d_sae", None)
    return int(width(layer)) if callable(width) else saes[layer].d_sae
