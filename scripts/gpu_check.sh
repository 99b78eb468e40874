#!/usr/bin/env bash
# The one prepared GPU check of issue #17 (< 8 minutes on one H100/H200, one device call, timeout_s=600): docs/gpu.md.
#   0. install the carried cp312 wheels (.whl/: megatron-core 0.16.1, liger-kernel) into /tmp/site
#   1. cpt env --json                                   (versions, the megatron-core pin, kernel choices + reasons)
#   2. tiny model, fp32, first losses on GPU vs CPU     (cpt smoke on both; must match 1e-5)
#   3. SmolLM2-135M import + verify, 50 bf16 steps, save, export (+ verify), transformers reload   (scripts/gpu_real_model.py)
#   4. bench/throughput.py: ours vs HF eager vs HF + torch.compile, 1.5B Llama shape, seq 2048, mbs 4, full AdamW step
#   5. scripts/gpu_report.py -> $OUT/gpu_check.json (everything) + $OUT/gpu_check.md (table); logs in $OUT/summary.txt
# Usage: bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR default: $OUT, else ./gpu_out)
# --dry-run (or GPU_CHECK_DRY=1): every step in its tiny CPU form (tests); GPU_CHECK_SKIP=smoke,real,bench skips steps.
set -uo pipefail

DRY="${GPU_CHECK_DRY:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-${OUT:-$PWD/gpu_out}}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # big files stay out of $OUT (8 files come back)
PY="${PYTHON:-python3}"
SKIP=",${GPU_CHECK_SKIP:-},"
BENCH_VARIANTS="${BENCH_VARIANTS:-ours,hf_eager,hf_compile}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-220}"
REAL_TIMEOUT="${REAL_TIMEOUT:-150}"
GGUF="${SMOLLM2_GGUF:-.models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TINY_CFG=recipes/models/tiny_llama.json
SMOKE_ARGS=(--hf-config "$TINY_CFG" --steps 3 --dtype fp32 --seq-len 32 --global-batch 4 --micro-batch 2)
BENCH_ARGS=(--steps 5 --warmup 3 --variants "$BENCH_VARIANTS")
REAL_ARGS=(--steps 50 --gguf "$GGUF")
if [[ "$DRY" == "1" ]]; then
    BENCH_ARGS=(--tiny --steps 1 --warmup 1 --variants "${BENCH_VARIANTS_DRY:-ours,hf_eager}")
    REAL_ARGS=(--dry-run)
fi
status=0

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/summary.txt"; }
skip() { [[ "$SKIP" == *",$1,"* ]]; }
tail_err() { tail -c 1500 "$1" >> "$OUT/summary.txt" 2>/dev/null; }

# 0. wheels (the GPU image has torch/transformers/triton but no megatron-core)
if [[ "$DRY" != "1" ]] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { log "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [[ "$DRY" == "1" ]]; then log "dry run (CPU, tiny shapes): work dir $WORK"; else log "no .whl/ carried: the image's packages"; fi
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1 || true

# 1. environment, the megatron-core pin, kernel choices
"$PY" -m cpt_megatron env --json > "$WORK/env.json" 2> "$WORK/env.err" || { log "cpt env failed"; tail_err "$WORK/env.err"; status=1; }
log "env: $(tail -n 1 "$WORK/env.json" | head -c 300)"

# 2. first losses, tiny model, fp32: GPU vs CPU
if ! skip smoke; then
    timeout 100 "$PY" -m cpt_megatron smoke "${SMOKE_ARGS[@]}" --json > "$WORK/smoke_gpu.json" 2> "$WORK/smoke_gpu.err" \
        || { log "GPU smoke failed"; tail_err "$WORK/smoke_gpu.err"; status=1; }
    CUDA_VISIBLE_DEVICES="" timeout 100 "$PY" -m cpt_megatron smoke "${SMOKE_ARGS[@]}" --json \
        > "$WORK/smoke_cpu.json" 2> "$WORK/smoke_cpu.err" || { log "CPU smoke failed"; tail_err "$WORK/smoke_cpu.err"; status=1; }
fi

# 3. the real model: import + verify, bf16 steps, save, export + verify, transformers reload
if ! skip real; then
    timeout "$REAL_TIMEOUT" "$PY" scripts/gpu_real_model.py --out "$WORK/real" "${REAL_ARGS[@]}" \
        > "$WORK/real.json" 2> "$WORK/real.err" || { log "real-model leg failed"; tail_err "$WORK/real.err"; status=1; }
fi

# 4. throughput, all variants in one process
if ! skip bench; then
    timeout "$BENCH_TIMEOUT" "$PY" bench/throughput.py "${BENCH_ARGS[@]}" --json "$WORK/throughput.json" \
        > "$WORK/bench.log" 2>&1 || { log "bench failed"; tail_err "$WORK/bench.log"; status=1; }
    grep -E "ms/step|best HF" "$WORK/bench.log" | tee -a "$OUT/summary.txt"
fi

# 5. one JSON + one markdown table
"$PY" scripts/gpu_report.py "$WORK" "$OUT" >> "$OUT/summary.txt" 2>&1 || status=1
log "done, status $status: $OUT/gpu_check.json, $OUT/gpu_check.md"
[[ "${GPU_CHECK_KEEP:-0}" == "1" ]] || rm -rf "$WORK"
exit "$status"
