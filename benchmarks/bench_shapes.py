"""B4: B1 and B2 at the paper's real shapes with random weights (no download).

B1: plain forward vs sparse vs reference full-SAE ablation; greedy generation plain vs sparse
ablation (what the K ladders spend their time on). B2: Algorithm 1 literal vs batched for one
prompt with a top-10-per-layer pool. Gemma-2-2B with Gemma Scope-shaped SAEs (16k / 65k) at all
26 layers, Llama-3.1-8B with Llama Scope-shaped SAEs (32k) at all 32 layers. On random weights
P("I") barely moves, so B2's sets are mostly empty: it times passes, it says nothing about
refusal. `--small` shrinks every dimension so the same code runs on a CPU in seconds (CI).

    python benchmarks/bench_shapes.py --arch gemma-2-2b --d-sae 16384 [--dtype bfloat16] [--small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from refusalscope.artifacts import writable_arg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # offline tiny tokenizers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_ablation

SHAPES = {  # from the models' config.json (hidden, mlp, layers, heads, kv heads, head dim, vocab)
    "gemma-2-2b": dict(hidden=2304, mlp=9216, layers=26, heads=8, kv=4, head_dim=256, vocab=256000),
    "llama-3.1-8b": dict(hidden=4096, mlp=14336, layers=32, heads=32, kv=8, head_dim=128, vocab=128256),
}
SMALL = dict(hidden=64, mlp=128, layers=4, heads=4, kv=2, head_dim=16, vocab=512)


def random_hf_model(arch: str, small: bool, tok, dtype: torch.dtype, device: str, seed: int = 0,
                    shape: dict | None = None):
    """A random-weight HF model of `arch` at its real shape (or SMALL, or `shape`), sized for `tok`."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    s = shape or (SMALL if small else SHAPES[arch])
    gemma = arch.startswith("gemma")
    common = dict(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv"], head_dim=s["head_dim"], max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Gemma2Config(**common) if gemma else LlamaConfig(**common)
    torch.manual_seed(seed)
    with torch.device(device):
        return (Gemma2ForCausalLM if gemma else LlamaForCausalLM)(cfg).to(dtype).eval()


def build(arch: str, small: bool, d_sae: int, dtype: torch.dtype, device: str):
    from tiny import tiny_tokenizer

    from refusalscope.io.model import ChatModel
    from refusalscope.io.saes import FeatureDictionary, SAESet, make_jumprelu_sae

    s = SMALL if small else SHAPES[arch]
    tok = tiny_tokenizer("gemma" if arch.startswith("gemma") else "chatml")
    model = ChatModel(random_hf_model(arch, small, tok, dtype, device), tok, name=arch)
    d, g = s["hidden"], torch.Generator(device=device).manual_seed(0)
    saes = {}
    for layer in range(s["layers"]):
        saes[layer] = make_jumprelu_sae(
            torch.randn(d, d_sae, generator=g, device=device) / d ** 0.5,
            torch.randn(d_sae, d, generator=g, device=device) / d ** 0.5,
            torch.zeros(d_sae, device=device), torch.zeros(d, device=device),
            torch.full((d_sae,), 0.5, device=device), hook_name=f"blocks.{layer}.hook_resid_post",
            dtype=dtype, device=device)
    return model, SAESet({l: FeatureDictionary.from_sae(x, l) for l, x in saes.items()}, saes=saes)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(SHAPES), default="gemma-2-2b")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny dimensions (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-batch", type=int, nargs="*", default=[32, 128], help="rows generated at once (none: skip)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--stage2-k", type=int, default=10, help="B2 pool: top-k per layer (0: skip B2)")
    ap.add_argument("--literal-budget-s", type=float, default=60.0,
                    help="time the literal Algorithm 1 this long, extrapolate the rest")
    ap.add_argument("--out", type=writable_arg, default=None)
    args = ap.parse_args(argv)
    from bench_ablation import ablation_rows, generation_rows, print_rows
    from bench_stage2 import compare_stage2, pool_for, print_stage2

    from refusalscope.io.prompts import load_bundled

    dtype = getattr(torch, args.dtype)
    model, saes = build(args.arch, args.small, args.d_sae, dtype, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    batch = model.encode([p.text for p in load_bundled("harmful", split="test")][: args.batch])
    rows = ablation_rows(model, saes, batch, args.sizes, args.repeats, sync)
    harmful = [p.text for p in load_bundled("harmful", split="test")]
    for gb in args.gen_batch:
        gen = model.encode((harmful * (1 + gb // len(harmful)))[:gb])
        for r in generation_rows(model, saes, gen, args.sizes[len(args.sizes) // 2], args.gen_tokens,
                                 max(1, args.repeats // 2), sync):
            rows.append({**r, "batch": gb})
    stage2 = None
    if args.stage2_k:
        stage2 = compare_stage2(model, saes, harmful[0], pool_for(model, saes, args.stage2_k), 48, sync,
                                args.literal_budget_s)
    result = {"arch": args.arch, "small": args.small, "d_sae": args.d_sae, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "layers": len(saes), "batch": args.batch, "tokens": int(batch.attention_mask.sum()), "rows": rows,
              "gen_batch": args.gen_batch, "gen_tokens": args.gen_tokens, "stage2": stage2}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.arch}{' (small)' if args.small else ''}, {len(saes)} layers x {args.d_sae} latents, "
          f"{args.dtype} on {result['device']}")
    print_rows(rows)
    if stage2:
        print("B2 (Algorithm 1, one prompt, 8 τ × 3 seeds):")
        print_stage2(stage2)
    return result


if __name__ == "__main__":
    main()
