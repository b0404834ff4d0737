"""Out of memory on a batched forward or generation: halve the batch and run the call again.

A long search meets prompts of every length on a shared GPU; one long batch running out of memory
should cost a retry, not the run. `halve_on_oom` wraps a `ChatModel` method that takes a
`batch_size`: on an out-of-memory error it frees the cache, halves the batch (remembered per model
and method, so later calls start at the size that fitted), says so once through `model.log`, and
runs the call again from its start (no partial result is kept). One row that does not fit ends in a
one-line error. On a CPU the same path runs when a test raises `torch.cuda.OutOfMemoryError`.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from ..errors import UserError


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()  # MPS, cuBLAS, older torch


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log(model, msg: str) -> None:
    log = getattr(model, "log", None)
    if log is not None:
        log(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def halve_on_oom(method):
    """Decorator for `method(self, batch, ..., batch_size=None, ...)` (see the module docstring)."""
    name = method.__name__
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, batch, *args, **kwargs):
        call = signature.bind(self, batch, *args, **kwargs)
        caps = self.__dict__.setdefault("_oom_caps", {})
        asked = call.arguments.get("batch_size") or len(batch)
        size = min(asked, caps.get(name, asked))
        while True:
            call.arguments["batch_size"] = size
            try:
                return method(*call.args, **call.kwargs)
            except Exception as err:
                if not is_oom(err):
                    raise
                _free()
                if size <= 1:
                    raise UserError(f"out of memory on a single row in {name} ({self.name} on {self.device}): "
                                    "use a smaller dtype (model.dtype: bfloat16), fewer generation.max_new_tokens "
                                    "or a device with more memory") from None
                size = max(1, min(size, len(batch)) // 2)
                caps[name] = size
                _log(self, f"out of memory in {name} ({self.device}): batch halved to {size} rows and retried "
                           f"(set a smaller batch size in the config to start there)")
    return wrapper
