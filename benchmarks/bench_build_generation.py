"""B5: the demo-world build's generation, before and after its speed-ups.

before: prompts in their given order, batches of 32, and P("I") by a second forward pass (how the
build generated base replies and the quality table until this change); after: rows sorted by
length, batches of 64, P("I") recorded at the generation's first step (`generate_by_length`).
Base GGUF model, bundled harmless training prompts, 16 new tokens, median of `--repeats`. Checks
that both give the same replies and the same P("I").

    python benchmarks/bench_build_generation.py [--n 256] [--repeats 3] [--out bench_build_generation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from refusalscope.artifacts import writable_arg
from refusalscope.demo.corpus import generate_by_length
from refusalscope.demo.recipe import base_gguf_path
from refusalscope.io.model import load_chat_model
from refusalscope.io.prompts import load_bundled


def before(model, prompts, new_tokens):
    batch = model.encode(prompts)
    texts = model.generate(batch, max_new_tokens=new_tokens, batch_size=32)
    p = model.next_token_probs(batch, batch_size=32)[:, model.refusal_token_ids].sum(1)
    return texts, p


def after(model, prompts, new_tokens):
    g = generate_by_length(model, prompts, True, new_tokens, 64)
    return g.texts, g.p_refusal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=writable_arg, default="bench_build_generation.json")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    model = load_chat_model(base_gguf_path(), dtype="float32", device="cpu", name="smollm2-base")
    prompts = [p.text for p in load_bundled("harmless", split="train")][: a.n]
    times, outs = {}, {}
    for name, fn in (("before", before), ("after", after)):
        runs = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            outs[name] = fn(model, prompts, a.new_tokens)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    same = sum(x == y for x, y in zip(outs["before"][0], outs["after"][0]))
    p_diff = (outs["before"][1] - outs["after"][1]).abs().max().item()
    res = {"prompts": len(prompts), "new_tokens": a.new_tokens, "repeats": a.repeats,
           "before_s": round(times["before"], 2), "after_s": round(times["after"], 2),
           "speedup": round(times["before"] / times["after"], 2),
           "identical_replies": same, "max_p_I_difference": p_diff}
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
