#!/usr/bin/env bash
# B4c + B6 on a lent GPU in one call of about 8 minutes (BUDGET seconds): eager vs compiled passes at
# Gemma-2-2B x 16k shapes (bench_compile.py) while the planted world is built at the real shapes
# (planted_world.py), then the whole pipeline on that world eagerly, then compiled with the time left
# (stages are recorded as they finish, so a cut-off run still reports them).
#   bash benchmarks/gpu_pipeline.sh OUTDIR [PROMPTS]      # GPU
#   SMALL=1 bash benchmarks/gpu_pipeline.sh OUTDIR 8      # the same flow at tiny sizes on a CPU
# CTIME=0 skips B4c, EAGER=0 the eager pipeline; RESERVE: seconds kept for the compiled pipeline
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench/gpu}; N=${2:-12}; BUDGET=${BUDGET:-520}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/steps.log"; }
WORLD=${WORLD:-/tmp/planted-world}
if [ "${SMALL:-}" = 1 ]; then
  WARGS="--small"; CARGS="--small --d-sae 256 --dtype float32 --device cpu --batches 4 8 --size 16 --gen-batch 4 --gen-tokens 4 --repeats 2"
  PARGS="--small"
else
  WARGS=""; CARGS=""; PARGS=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
fi
"$PY" -c "import torch, transformers, sae_lens, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sae_lens', sae_lens.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/env.txt"
rm -rf "$WORLD"
say "world build and B4c start"
timeout 240 "$PY" benchmarks/planted_world.py "$WORLD" $WARGS > "$OUT/world.log" 2>&1 &
wpid=$!
[ "${CTIME:-200}" -gt 0 ] && { timeout ${CTIME:-200} "$PY" benchmarks/bench_compile.py $CARGS --out "$OUT/compile.json" > "$OUT/compile.log" 2>&1; say "B4c exit $?"; }
wait $wpid; say "world exit $?"
cp "$WORLD/world.json" "$OUT/" 2>/dev/null
t=$(( $(left) - ${RESERVE:-120} )); [ "${SMALL:-}" = 1 ] && t=600
[ "${EAGER:-1}" = 1 ] && { timeout $t "$PY" benchmarks/bench_planted_pipeline.py --world "$WORLD" --prompts "$N" $PARGS --run /tmp/planted-run-eager \
  --out "$OUT/pipeline_eager.json" > "$OUT/eager.log" 2>&1; say "eager pipeline exit $? (limit $t s)"; }
t=$(( $(left) - 8 )); [ "${SMALL:-}" = 1 ] && t=600
if [ "$t" -gt 45 ]; then
  timeout $t "$PY" benchmarks/bench_planted_pipeline.py --world "$WORLD" --prompts "$N" $PARGS --compile \
    --run /tmp/planted-run-compiled --out "$OUT/pipeline_compiled.json" > "$OUT/compiled.log" 2>&1
  say "compiled pipeline exit $? (limit $t s)"
fi
for f in compile eager compiled world; do echo "== $f"; grep -v -i "warn\|it/s\]" "$OUT/$f.log" 2>/dev/null | tail -n 18; done
