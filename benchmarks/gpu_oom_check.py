"""A real CUDA out-of-memory error on a batched forward and on a generation (io/oom.py).

The GPU is filled until the asked batch cannot fit; `ChatModel.logits` (all positions) and
`generate_full` are then called with that batch. The check passes when each call halved its batch
(say so in the log), finished, and returned exactly what a plain call at the size that fitted
returns. Needs a CUDA device and torch, transformers, tokenizers, tqdm (no sae-lens, no pydantic).

    python benchmarks/gpu_oom_check.py --out runs/bench/gpu_oom.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from refusalscope.artifacts import writable_arg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from tiny import tiny_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from refusalscope.io.model import ChatModel  # noqa: E402

GIB = 1024 ** 3


def build(vocab: int, d: int, layers: int) -> ChatModel:
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model = ChatModel(hf, tok)
    model.lines = []
    model.log = lambda msg: (model.lines.append(msg), print(msg, flush=True))
    return model


def fill(leave_gib: float) -> torch.Tensor:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(0, int(free - leave_gib * GIB)), dtype=torch.uint8, device="cuda")


def check(name: str, model: ChatModel, call, same, asked: int, leave_gib: float) -> dict:
    model.__dict__.pop("_oom_caps", None)
    model.lines.clear()
    filler = fill(leave_gib)
    t0 = time.perf_counter()
    got = call(asked)
    seconds = time.perf_counter() - t0
    cap = model._oom_caps.get(name, asked)
    want = call(cap)  # a plain call at the size that fitted (the cap is remembered, so no retry)
    del filler
    torch.cuda.empty_cache()
    return {"method": name, "asked": asked, "fitted": cap, "halvings": len(model.lines), "seconds": round(seconds, 2),
            "equal_to_plain_call": bool(same(got, want)), "log": model.lines[:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=writable_arg, default="runs/bench/gpu_oom.json")
    ap.add_argument("--tokens", type=int, default=400, help="prompt length in tokens (roughly)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_oom_check: no CUDA device", file=sys.stderr)
        return 2
    model = build(vocab=32000, d=512, layers=4)
    words = "the quick brown fox jumps over the lazy dog and "
    texts = [(words * (args.tokens // 10))[: 4 * args.tokens - 13 * i] for i in range(256)]
    batch = model.encode(texts)
    print(f"{torch.cuda.get_device_name()}: batch {batch.input_ids.shape}", flush=True)
    rows = [check("logits", model, lambda bs: model.logits(batch, last=None, batch_size=bs),
                  torch.equal, asked=256, leave_gib=3),
            check("generate_full", model, lambda bs: model.generate_full(batch, 16, batch_size=bs),
                  lambda a, b: a.texts == b.texts and torch.equal(a.p_refusal, b.p_refusal), asked=256,
                  leave_gib=0.75)]
    for r in rows:
        print(f"{r['method']}: asked {r['asked']}, fitted {r['fitted']} after {r['halvings']} halvings, "
              f"{r['seconds']} s, equal to a plain call: {r['equal_to_plain_call']}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    ok = all(r["halvings"] >= 1 and r["equal_to_plain_call"] for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
