"""refusalscope from Python: the refusal direction, Stage 1 and Stage 2 on a few prompts, and a
reply with a prompt's minimal latent set ablated. Runs on the demo world by default:
    python examples/quickstart.py                 (or --model DIR --saes 'DIR/layer_{layer}' ...)"""
import argparse

import refusalscope as rs

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="demo")
ap.add_argument("--saes", default="demo", help="'demo' or a folder template with {layer}")
ap.add_argument("--harmful", default="bundled:harmful:train")
ap.add_argument("--harmless", default="bundled:harmless:train")
ap.add_argument("--judge", default="substring")
ap.add_argument("--threshold", type=float, help="first-token judge: P('I') that counts as refusal")
ap.add_argument("--degenerate-ok", action="store_true", help="count degenerate replies as jailbreaks")
ap.add_argument("--ks", type=int, nargs="+", default=list(range(2, 31, 2)), help="Stage 1 K ladder")
ap.add_argument("-n", type=int, default=6, help="prompts to dissect")
args = ap.parse_args()

model = rs.load_model(args.model)
saes = rs.load_saes(args.saes, model=model)
harmful, harmless = rs.load_prompts(args.harmful)[:32], rs.load_prompts(args.harmless)[:32]
judge = rs.make_judge(args.judge, args.degenerate_ok, **({"threshold": args.threshold} if args.threshold else {}))

choice = rs.find_direction(model, harmful[::2], harmless[::2], val_harmful=harmful[1::2][:8],
                           val_harmless=harmless[1::2][:8], judge=judge, n_generate=2)
print(f"refusal direction: layer {choice.layer}")
prompts = harmful[1::2][: args.n]
stage1, candidates = rs.stage1(model, saes, prompts, choice, judge, ks=args.ks)
print("Stage 1 K per prompt:", {r.id: r.k for r in stage1})
for r in rs.stage2(model, saes, prompts, candidates, judge):
    print(f"{r.id}: minimal set {r.set.ids() if r.set else None} (inactive: {r.inactive.ids() if r.inactive else []})")
    if r.set:
        text = next(p.text for p in prompts if p.id == r.id)
        print("  plain:  ", rs.generate(model, [text], max_new_tokens=24)[0][:100])
        print("  ablated:", rs.generate(model, [text], saes, ablate=r.set, max_new_tokens=24)[0][:100])
