"""B4: B1 at the paper's real shapes with random weights (no download): plain forward vs sparse
vs reference full-SAE ablation, Gemma-2-2B with Gemma Scope-shaped SAEs (16k / 65k) at all 26
layers, Llama-3.1-8B with Llama Scope-shaped SAEs (32k) at all 32 layers. `--small` shrinks every
dimension so the same code runs on a CPU in seconds (CI smoke test).

    python benchmarks/bench_shapes.py --arch gemma-2-2b --d-sae 16384 [--dtype bfloat16] [--small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # offline tiny tokenizers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_ablation

SHAPES = {  # from the models' config.json (hidden, mlp, layers, heads, kv heads, head dim, vocab)
    "gemma-2-2b": dict(hidden=2304, mlp=9216, layers=26, heads=8, kv=4, head_dim=256, vocab=256000),
    "llama-3.1-8b": dict(hidden=4096, mlp=14336, layers=32, heads=32, kv=8, head_dim=128, vocab=128256),
}
SMALL = dict(hidden=64, mlp=128, layers=4, heads=4, kv=2, head_dim=16, vocab=512)


def build(arch: str, small: bool, d_sae: int, dtype: torch.dtype, device: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from refusalscope.io.model import ChatModel
    from refusalscope.io.saes import FeatureDictionary, SAESet, make_jumprelu_sae
    from tiny import tiny_tokenizer

    s = SMALL if small else SHAPES[arch]
    gemma = arch.startswith("gemma")
    tok = tiny_tokenizer("gemma" if gemma else "chatml")
    common = dict(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv"], head_dim=s["head_dim"], max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Gemma2Config(**common) if gemma else LlamaConfig(**common)
    torch.manual_seed(0)
    with torch.device(device):
        hf = (Gemma2ForCausalLM if gemma else LlamaForCausalLM)(cfg).to(dtype).eval()
    model = ChatModel(hf, tok, name=arch)
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from bench_ablation import ablation_rows, print_rows

    from refusalscope.io.prompts import load_bundled

    dtype = getattr(torch, args.dtype)
    model, saes = build(args.arch, args.small, args.d_sae, dtype, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    batch = model.encode([p.text for p in load_bundled("harmful", split="test")][: args.batch])
    rows = ablation_rows(model, saes, batch, args.sizes, args.repeats, sync)
    result = {"arch": args.arch, "small": args.small, "d_sae": args.d_sae, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "layers": len(saes), "batch": args.batch, "tokens": int(batch.attention_mask.sum()), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.arch}{' (small)' if args.small else ''}, {len(saes)} layers x {args.d_sae} latents, "
          f"{args.dtype} on {result['device']}")
    print_rows(rows)
    return result


if __name__ == "__main__":
    main()
