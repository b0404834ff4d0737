#!/usr/bin/env bash
# B4 on a lent GPU (no network there): B1 (+ generation) and B2 at the real shapes, random weights, bf16.
#   bash benchmarks/gpu.sh            # GPU: Gemma-2-2B x 16k and 65k SAEs, Llama-3.1-8B x 32k SAEs
#   bash benchmarks/gpu.sh --small    # any machine: the same code at tiny sizes (CI smoke test)
# Results: runs/bench/shapes-*.json and a printed table per setup. Budget: < 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for mod in torch transformers tokenizers sae_lens pydantic; do
  "$PY" -c "import $mod" 2>/dev/null || { echo "gpu.sh: python module '$mod' is missing: install refusalscope's requirements (pip install -c constraints.txt -e .) or set PYTHON to an interpreter that has them" >&2; exit 2; }
done
mkdir -p runs/bench
if [ "${1:-}" = "--small" ]; then
  "$PY" benchmarks/bench_shapes.py --small --arch gemma-2-2b --d-sae 256 --dtype float32 --device cpu --sizes 4 16 --repeats 2 --gen-batch 4 --gen-tokens 4 --stage2-k 5 --literal-budget-s 5 --out runs/bench/shapes-small-gemma.json
  "$PY" benchmarks/bench_shapes.py --small --arch llama-3.1-8b --d-sae 256 --dtype float32 --device cpu --sizes 4 16 --repeats 2 --gen-batch 4 --gen-tokens 4 --stage2-k 0 --out runs/bench/shapes-small-llama.json
  exit 0
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu.sh: no CUDA device: run with --small on a CPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
run() { timeout 160 "$PY" benchmarks/bench_shapes.py --dtype bfloat16 "$@" || echo "gpu.sh: setup '$*' failed or ran past 160 s" >&2; }
run --arch gemma-2-2b --d-sae 16384 --literal-budget-s 45 --out runs/bench/shapes-gemma-16k.json
run --arch gemma-2-2b --d-sae 65536 --stage2-k 0 --out runs/bench/shapes-gemma-65k.json
run --arch llama-3.1-8b --d-sae 32768 --literal-budget-s 45 --out runs/bench/shapes-llama-32k.json
"$PY" benchmarks/project_paper_run.py runs/bench/shapes-gemma-16k.json || true
