"""A latent's identity and sets of latents: the one codec for the paper's "layer-index" ids,
grouping by layer, and turning a set into an ablation or a clamp.

`Feature` is a NamedTuple, so it unpacks, sorts and hashes like the (layer, index) pair it is;
JSON writes it as the "layer-index" string (`ids()`, `str(f)`), and `Feature.of` reads back any
of the three spellings found in the field: a Feature, a (layer, index) pair, or "layer-index".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, overload

from ..errors import UserError
from ..io.saes import sae_width
from .spec import FeatureAblation, FeatureClamp, Intervention, Positions


class Feature(NamedTuple):
    """One SAE latent: `index` of the SAE at residual layer `layer` (layers count from 0)."""

    layer: int
    index: int  # type: ignore[assignment]  # public field name; it shadows tuple.index on purpose

    @classmethod
    def of(cls, value: Any) -> Feature:
        """A Feature from a Feature, a (layer, index) pair or a "layer-index" string."""
        if isinstance(value, Feature):
            return value
        if isinstance(value, str):
            parts = value.strip().split("-")
            if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
                return cls(int(parts[0]), int(parts[1]))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            try:
                layer, index = int(value[0]), int(value[1])
            except (TypeError, ValueError):
                pass
            else:
                if layer >= 0 and index >= 0:
                    return cls(layer, index)
        raise UserError(f"bad feature id {value!r}: write it as layer-index, e.g. 12-1234")

    def __str__(self) -> str:
        return f"{self.layer}-{self.index}"

    @property
    def id(self) -> str:
        """The paper's "layer-index" label, e.g. "12-1234"."""
        return str(self)


class FeatureSet(Sequence[Feature]):
    """Distinct features in first-seen order; immutable and hashable like a tuple.

    `sorted()` gives (layer, index) order; `by_layer()` the {layer: [indices]} table the
    engine's interventions take; `plan()` the row plan that ablates the set.
    """

    __slots__ = ("_items", "_set")

    def __init__(self, items: Iterable[Any] = ()):
        self._items: tuple[Feature, ...] = tuple(dict.fromkeys(Feature.of(x) for x in items))
        self._set: frozenset[Feature] | None = None  # built on the first `in` (then O(1) per test)

    @classmethod
    def from_layers(cls, table: Mapping[int, Iterable[int]]) -> FeatureSet:
        """The set of a {layer: [indices]} table."""
        return cls(Feature(int(l), int(i)) for l, ids in table.items() for i in ids)

    # ------------------------------------------------------------- sequence protocol
    @overload
    def __getitem__(self, i: int) -> Feature: ...

    @overload
    def __getitem__(self, i: slice) -> FeatureSet: ...

    def __getitem__(self, i):
        return FeatureSet(self._items[i]) if isinstance(i, slice) else self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Feature]:
        return iter(self._items)

    def __contains__(self, item: object) -> bool:
        try:
            if self._set is None:
                self._set = frozenset(self._items)
            return Feature.of(item) in self._set
        except UserError:
            return False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FeatureSet):
            return self._items == other._items
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        shown = ", ".join(self.ids()[:8]) + (", …" if len(self) > 8 else "")
        return f"FeatureSet([{shown}])"

    def __or__(self, other: Iterable[Any]) -> FeatureSet:
        return FeatureSet([*self._items, *FeatureSet(other)])

    def __sub__(self, other: Iterable[Any]) -> FeatureSet:
        drop = set(FeatureSet(other))
        return FeatureSet(f for f in self._items if f not in drop)

    # ------------------------------------------------------------- views
    def sorted(self) -> FeatureSet:
        return FeatureSet(sorted(self._items))

    def ids(self) -> list[str]:
        """The "layer-index" strings, in set order (what JSON records hold)."""
        return [str(f) for f in self._items]

    def layers(self) -> list[int]:
        return sorted({f.layer for f in self._items})

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: sorted indices}, layers ascending."""
        out: dict[int, list[int]] = {}
        for f in self._items:
            out.setdefault(f.layer, []).append(f.index)
        return {l: sorted(v) for l, v in sorted(out.items())}

    def checked(self, saes) -> FeatureSet:
        """Self, after checking every feature names a loaded SAE layer and a latent it has."""
        for f in self._items:
            if f.layer not in saes:
                raise UserError(f"feature {f} is on layer {f.layer}, which has no SAE: use layers "
                                f"{sorted(saes.keys())}")
            if not 0 <= f.index < (width := sae_width(saes, f.layer)):
                raise UserError(f"feature {f} is outside the layer-{f.layer} SAE "
                                f"({width} latents): check the index")
        return self

    # ------------------------------------------------------------- interventions
    def ablation(self, positions: Positions = "all") -> FeatureAblation:
        return FeatureAblation({l: tuple(v) for l, v in self.by_layer().items()}, positions)

    def plan(self, positions: Positions = "all") -> list[Intervention]:
        """The row plan that zero-ablates the set ([] for an empty set: the plain model)."""
        return [self.ablation(positions)] if self._items else []

    def clamp(self, value: float, positions: Positions = (0,)) -> FeatureClamp:
        """Set every latent of the set to `value` at `positions` (default: BOS)."""
        return FeatureClamp({l: {i: float(value) for i in ids} for l, ids in self.by_layer().items()},
                            positions)

