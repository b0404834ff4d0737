"""Run the refusalscope CLI with a fault planted in its writes, for kill/resume and disk-full tests.

    python tests/faults.py SPEC -- run -c cfg.yaml -r runs/x -q

SPEC is one of
  count:FILE        no fault; at exit write {"write": n, "append": n} (how many events a run has)
  kill@write:N      SIGKILL inside the N-th atomic write: its temp file is written half, never renamed
  kill@append:N     SIGKILL inside the N-th checkpoint append: half a JSON line reaches the file
  enospc@write:N    the N-th atomic write fails with ENOSPC (no space left) after writing half
  enospc@append:N   the N-th checkpoint append fails with ENOSPC after writing half a line
  int@write:N       SIGINT (Ctrl-C) to itself inside the N-th atomic write, its temp file half written
  term@append:N     SIGTERM to itself inside the N-th checkpoint append (int/term go with write/append)
  oom@rows:N        every decoder layer raises CUDA's OutOfMemoryError on chunks over N rows

The patches wrap `refusalscope.artifacts` before anything else imports it, so every writer in the
package (stores, plots, tables, checkpoints) goes through them; the CLI then runs as a user runs it.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _half(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}


def install(spec: str) -> None:
    from refusalscope import artifacts

    counts = {"write": 0, "append": 0}
    action, _, rest = spec.partition("@")
    kind, _, n = rest.partition(":")
    if spec.startswith("count:"):
        out = Path(spec.split(":", 1)[1])
        atexit.register(lambda: out.write_text(json.dumps(counts)))
    if action == "oom":
        _install_oom(int(n))
        return
    target = int(n) if n else -1
    real_write, real_add = artifacts.atomic_write, artifacts.Checkpoint.add
    if action == "int":  # a foreground Ctrl-C: a parent that ignores SIGINT (pytest after some tests,
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job) passes that on

    def fail() -> None:
        if action in SIGNALS:  # SIGKILL never returns; SIGINT/SIGTERM raise the handler's exception here
            os.kill(os.getpid(), SIGNALS[action])
            time.sleep(30)  # the handler runs at once; the sleep only keeps the next line from running first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def atomic_write(path, write):
        counts["write"] += 1
        if kind == "write" and counts["write"] == target:
            def torn(tmp):
                write(tmp)
                _half(tmp)
                fail()
            return real_write(path, torn)
        return real_write(path, write)

    def add(self, record):
        counts["append"] += 1
        if kind == "append" and counts["append"] == target:
            line = json.dumps(record, default=artifacts._jsonable) + "\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            try:
                fail()
            except OSError as err:
                raise artifacts.disk_full_error(self.path, err) from None
        return real_add(self, record)

    artifacts.atomic_write = atomic_write
    artifacts.Checkpoint.add = add


def _install_oom(budget: int) -> None:
    import torch
    from transformers.models.llama import modeling_llama

    layer = modeling_llama.LlamaDecoderLayer
    real = layer.forward

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states.shape[0] > budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, hidden_states, *args, **kwargs)

    layer.forward = forward


def run_cli(fault: str, *args: str, timeout: float | None = 900) -> subprocess.CompletedProcess:
    """`refusalscope ARGS` in a new process with `fault` planted (see the module docstring)."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(tests / "faults.py"), fault, "--", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def main(argv: list[str]) -> None:
    spec, sep, *args = argv
    assert sep == "--", "usage: faults.py SPEC -- CLI ARGS"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    install(spec)
    from refusalscope.interfaces.cli import app

    app(args, prog_name="refusalscope")


if __name__ == "__main__":
    main(sys.argv[1:])
