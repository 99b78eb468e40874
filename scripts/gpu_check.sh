#!/usr/bin/env bash
# The one prepared GPU check (< 6 minutes on one H100/H200): see docs/gpu.md for the exact device call.
#   1. install the carried cp312 wheels (.whl/: megatron-core 0.16.1, liger-kernel) into /tmp/site
#   2. cpt env --json                      -> $OUT/env.json (kernel choices + reasons on this GPU)
#   3. tiny model fp32, first losses on GPU vs CPU (cpt smoke on both) -> $OUT/smoke_{gpu,cpu}.json, parity.txt
#   4. bench/throughput.py (issue #11 shape)                          -> $OUT/throughput.json, bench.log
# GPU_CHECK_DRY=1: CPU dry mode for tests: writes $OUT/plan.txt and runs only `cpt env`.
set -uo pipefail

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BENCH_VARIANTS="${BENCH_VARIANTS:-ours,hf_eager,hf_compile,ours:compile=off}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
TINY_CFG=recipes/models/tiny_llama.json
SMOKE_ARGS=(--hf-config "$TINY_CFG" --steps 3 --dtype fp32 --seq-len 32 --global-batch 4 --micro-batch 2)
status=0

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/summary.txt"; }

cat > "$OUT/plan.txt" <<EOF
install: $PY -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
env:     $PY -m cpt_megatron env --json
smoke:   $PY -m cpt_megatron smoke ${SMOKE_ARGS[*]} --json   (GPU, then CUDA_VISIBLE_DEVICES= for CPU)
bench:   timeout $BENCH_TIMEOUT $PY bench/throughput.py --steps 5 --warmup 3 --variants $BENCH_VARIANTS
EOF

if [[ "${GPU_CHECK_DRY:-0}" == "1" ]]; then
    log "dry mode: plan in $OUT/plan.txt"
    "$PY" -m cpt_megatron env --json > "$OUT/env.json" 2> "$OUT/env.err" || status=1
    exit "$status"
fi

# 1. wheels (the GPU image has torch/transformers/triton but no megatron-core)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { log "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "no .whl/ carried: using the image's packages"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true

# 2. environment and kernel choices
"$PY" -m cpt_megatron env --json > "$OUT/env.json" 2> "$OUT/env.err" || { log "cpt env failed"; status=1; }
log "env: $(head -c 400 "$OUT/env.json")"

# 3. first losses, tiny model, fp32: GPU vs CPU
timeout 120 "$PY" -m cpt_megatron smoke "${SMOKE_ARGS[@]}" --json > "$OUT/smoke_gpu.json" 2> "$OUT/smoke_gpu.err" \
    || { log "GPU smoke failed (see smoke_gpu.err)"; status=1; }
CUDA_VISIBLE_DEVICES="" timeout 120 "$PY" -m cpt_megatron smoke "${SMOKE_ARGS[@]}" --json \
    > "$OUT/smoke_cpu.json" 2> "$OUT/smoke_cpu.err" || { log "CPU smoke failed (see smoke_cpu.err)"; status=1; }
"$PY" - "$OUT" <<'EOF' | tee "$OUT/parity.txt" || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(name):
    return json.loads((out / name).read_text().strip().splitlines()[-1])["losses"]  # --json: last line
g, c = losses("smoke_gpu.json"), losses("smoke_cpu.json")
d = max(abs(a - b) for a, b in zip(g, c))
print(f"gpu {g}\ncpu {c}\nmax |dloss| {d:.2e} -> {'OK' if abs(g[0] - c[0]) < 1e-4 and d < 1e-3 else 'MISMATCH'}")
sys.exit(0 if abs(g[0] - c[0]) < 1e-4 and d < 1e-3 else 1)
EOF

# 4. throughput, all variants in one process
timeout "$BENCH_TIMEOUT" "$PY" bench/throughput.py --steps 5 --warmup 3 --variants "$BENCH_VARIANTS" \
    --json "$OUT/throughput.json" > "$OUT/bench.log" 2>&1 || { log "bench exit $? (see bench.log)"; status=1; }
grep -E "ms/step|best HF" "$OUT/bench.log" | tee -a "$OUT/summary.txt"
log "done, status $status"
exit "$status"
