"""Regional `torch.compile` of a decoder's layers: cuts the host overhead of GPU forward passes.

Why: an eager Gemma-2-2B forward at batch 16 launches about 6,000 kernels and the H200 waits on
the host between them; inductor fuses each layer's element-wise work (norms, soft-capping, GELU,
rotary) into a few kernels. Why per layer and per `forward`:
- every layer of a kind shares one graph, so compiling takes seconds, not the minute a whole-model
  compile takes, and `dynamic=True` makes that graph serve every batch size and prompt length
  (no length buckets, no recompiles across shards and stages);
- the residual hooks run in `Module._call_impl` around `forward`, so they stay eager: any
  intervention plan (per-row tables, recordings, early stops) works unchanged and never triggers a
  recompile.
Cached generation stays eager: the KV-cache update indexes a per-layer list by `layer_idx`, which
would specialise one graph per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _compile_time() -> float:
    """Seconds dynamo + inductor have spent compiling in this process (every compiled function)."""
    from torch._dynamo import utils

    spent = getattr(utils, "calculate_time_spent", None)
    return float(spent().get("entire_frame_compile", 0.0)) if spent else 0.0


class _Switch:
    """A layer's `forward`: the compiled one while its owner is active, the eager one otherwise."""

    def __init__(self, eager, compiled, owner: CompiledLayers):
        self.eager, self.compiled, self.owner = eager, compiled, owner

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.owner.active else self.eager)(*args, **kwargs)


class CompiledLayers:
    """Compiled forwards installed on `layers`; `on()` turns them on for a block of passes."""

    def __init__(self, layers: nn.ModuleList, mode: str | None = None, dynamic: bool = True):
        self.layers, self.mode, self.active = layers, mode, False
        self._since = _compile_time()
        for layer in layers:
            layer.forward = _Switch(layer.forward, torch.compile(layer.forward, mode=mode, dynamic=dynamic), self)

    @property
    def compile_seconds(self) -> float:
        """Compile time since these layers were installed (the ablation hook's graphs included)."""
        return _compile_time() - self._since

    @contextmanager
    def on(self) -> Iterator[None]:
        prev, self.active = self.active, True
        try:
            yield
        finally:
            self.active = prev

    def remove(self) -> None:
        """Put the eager forwards back."""
        for layer in self.layers:
            if isinstance(layer.__dict__.get("forward"), _Switch):
                del layer.forward
