#!/usr/bin/env bash
# One-command GPU check, for one H100/H200 with PyTorch (CUDA) and Triton. TensorRT and onnxruntime-gpu are
# used where present and skipped (with the reason) where not. No network and no install: it runs the
# repository from PYTHONPATH with the Python it finds, so it works on a machine that cannot fetch packages.
# Under 8 minutes without TensorRT (the measurements); the TensorRT part adds an engine build.
#
#   tools/gpu_check.sh              # PYTHON=python3 by default; results in out/gpu_check/
#   tools/gpu_check.sh --dry-run    # what would run on this machine, and why a part would be skipped
#   PRESET=tiny tools/gpu_check.sh  # the TensorRT part on the tiny preset (faster, less representative)
#
# Steps (each prints a PASS/FAIL/SKIP line; the summary repeats them; exit 1 if any FAIL):
#   1. gpu: nvidia-smi                          2. measure: tools/gpu_measure.py (Triton MoE kernels vs the
#      PyTorch reference, real-config forward per MoE lowering at 1024x1024 batch 1 and 2, projected image
#      times; table + JSON)                       3. Triton kernel tests on the GPU (tests/test_moe_triton.py)
#   4-10. TensorRT, when `import tensorrt` works: checkpoint (PRESET, default small), export (plugin MoE),
#      compare with ONNX Runtime, engines (tools/gpu_check.py build), Polygraphy against the PyTorch goldens,
#      timing (tools/gpu_check.py bench), a LoRA applied at load time by refitting the engine through its name
#      map, against PyTorch with the LoRA fused, then refit back (tools/gpu_check.py lora)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${HIDREAM_GPU_CHECK_DIR:-$REPO/out/gpu_check}"  # out/ is git-ignored
PY="${PYTHON:-python3}"
PRESET="${PRESET:-small}"
VARIANT="${VARIANT:-full}"
DTYPE="${DTYPE:-bf16}"
PLUGIN_IMPL="${PLUGIN_IMPL:-jit}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
CKPT="$WORK/ckpt-$PRESET-$VARIANT"
OUT="$WORK/engines/$VARIANT"
GOLD="$WORK/golden"
LOGS="$WORK/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 2

declare -a VERDICTS=()
FAILED=0
verdict() {  # verdict PASS|FAIL|SKIP|PLAN NAME REASON...
  local status="$1" name="$2"; shift 2
  local line; line="$(printf '%-4s  %-26s %s' "$status" "$name" "$*")"
  VERDICTS+=("$line")
  echo "==> $line"
  [[ "$status" == FAIL ]] && FAILED=1
  return 0
}
run_step() {  # run_step NAME LOGFILE CMD... ; output teed to the log; returns the command's status
  local name="$1" log="$2"; shift 2
  echo "---- $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "---- $name: exit $rc after $((SECONDS - start)) s (log: $log)"
  return "$rc"
}
summary() {
  echo
  echo "==================== gpu_check summary ($([[ $DRY_RUN == 1 ]] && echo 'dry run, ')$PRESET, $VARIANT, $DTYPE) ===================="
  printf '%s\n' "${VERDICTS[@]}"
  [[ -f "$WORK/gpu_measure.md" && $DRY_RUN == 0 ]] && cat "$WORK/gpu_measure.md"
  echo "work dir: $WORK"
  exit "$FAILED"
}

# ---- inputs this script needs ------------------------------------------------------------------------------
for f in tools/gpu_measure.py tools/gpu_check.py tools/make_tiny_checkpoint.py tests/test_moe_triton.py; do
  [[ -f "$f" ]] || { verdict FAIL inputs "$REPO/$f is missing"; summary; }
done
if ! "$PY" -c "import hidream_export, numpy" >/dev/null 2>&1; then
  verdict FAIL inputs "$PY cannot import hidream_export (PYTHONPATH=$REPO) and numpy"
  summary
fi
verdict PASS inputs "$("$PY" --version 2>&1), repository $REPO"
[[ $DRY_RUN == 1 ]] || mkdir -p "$WORK" "$LOGS"
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---- 1. a GPU? ---------------------------------------------------------------------------------------------------
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  verdict PASS gpu "$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -1)"
else
  verdict SKIP gpu "no NVIDIA GPU or driver (nvidia-smi missing or failing)"
fi

# ---- 2. measurements (PyTorch + Triton) ----------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
  "$PY" tools/gpu_measure.py --dry-run --out "$WORK" | sed 's/^/     /'
  if [[ $GPU == 1 ]] && has torch && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    verdict PLAN measure "tools/gpu_measure.py --out $WORK"
  else
    verdict SKIP measure "needs a CUDA GPU visible to PyTorch"
  fi
elif [[ $GPU == 0 ]]; then
  verdict SKIP measure "needs a CUDA GPU"
elif run_step measure "$LOGS/measure.log" "$PY" tools/gpu_measure.py --out "$WORK"; then
  verdict PASS measure "$WORK/gpu_measure.json, $WORK/gpu_measure.md"
else
  verdict FAIL measure "tools/gpu_measure.py failed (see $LOGS/measure.log)"
fi

# ---- 3. Triton kernel tests on the GPU -----------------------------------------------------------------------
if ! has pytest; then
  verdict SKIP "triton kernels (gpu)" "pytest is not installed"
elif [[ $GPU == 0 ]] || ! has triton; then
  verdict SKIP "triton kernels (gpu)" "needs a CUDA GPU and triton"
elif [[ $DRY_RUN == 1 ]]; then
  verdict PLAN "triton kernels (gpu)" "pytest tests/test_moe_triton.py (TRITON_INTERPRET unset)"
elif (unset TRITON_INTERPRET; run_step triton-tests "$LOGS/triton_tests.log" "$PY" -m pytest -p no:cacheprovider \
        tests/test_moe_triton.py -q -rs); then
  verdict PASS "triton kernels (gpu)" "$(grep -E 'passed|failed' "$LOGS/triton_tests.log" | tail -1)"
else
  verdict FAIL "triton kernels (gpu)" "$(grep -E 'passed|failed|error' "$LOGS/triton_tests.log" | tail -1)"
fi

# ---- 4-9. TensorRT --------------------------------------------------------------------------------------------
TRT_WHY=""
[[ $GPU == 1 ]] || TRT_WHY="no GPU"
has tensorrt || TRT_WHY="${TRT_WHY:+$TRT_WHY; }TensorRT is not installed (import tensorrt fails)"
if [[ -n "$TRT_WHY" ]]; then
  for step in checkpoint export compare "tensorrt build" polygraphy timing "lora (trt refit)"; do verdict SKIP "$step" "$TRT_WHY"; done
  summary
fi
if [[ $DRY_RUN == 1 ]]; then
  for step in checkpoint export compare "tensorrt build" polygraphy timing "lora (trt refit)"; do verdict PLAN "$step" "TensorRT path"; done
  summary
fi

if [[ -f "$CKPT/.complete" ]]; then
  verdict PASS checkpoint "reused $CKPT"
elif run_step checkpoint "$LOGS/checkpoint.log" "$PY" tools/make_tiny_checkpoint.py "$CKPT" --preset "$PRESET" \
       --full --variant "$VARIANT" --overwrite; then
  touch "$CKPT/.complete"
  verdict PASS checkpoint "wrote $CKPT ($PRESET preset, random weights)"
else
  verdict FAIL checkpoint "make_tiny_checkpoint.py failed (see $LOGS/checkpoint.log)"
  summary
fi
if run_step export "$LOGS/export.log" "$PY" -m hidream_export.cli export "$CKPT" --variant "$VARIANT" --out "$OUT" \
     --moe plugin --dtype "$DTYPE"; then
  verdict PASS export "$OUT/transformer/model.onnx (plugin MoE, $DTYPE)"
else
  verdict FAIL export "hidream-export export failed (see $LOGS/export.log)"
  summary
fi
mkdir -p "$GOLD"
OPT_SIZE="$("$PY" -c "import json,sys; e=json.load(open(sys.argv[1]))['components']['transformer']; print('%dx%d' % tuple(e['size_range']['opt']))" "$OUT/manifest.json")"
PROVIDERS="CPUExecutionProvider"
"$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" \
  2>/dev/null && PROVIDERS="CUDAExecutionProvider"
if [[ "$DTYPE" == bf16 && "$PROVIDERS" == CPUExecutionProvider ]]; then
  verdict SKIP "compare (onnxruntime)" "a bf16 graph needs onnxruntime-gpu (the CPU provider has no bf16 TopK)"
elif run_step compare "$LOGS/compare.log" "$PY" -m hidream_export.cli compare "$CKPT" "$OUT/transformer/model.onnx" \
     --sizes "$OPT_SIZE" --save-dir "$GOLD" --providers "$PROVIDERS"; then
  verdict PASS "compare (onnxruntime)" "ONNX Runtime ($PROVIDERS) matches PyTorch at $OPT_SIZE"
else
  verdict FAIL "compare (onnxruntime)" "out of tolerance or failed (see $LOGS/compare.log)"
fi
if run_step goldens "$LOGS/goldens.log" "$PY" tools/gpu_check.py goldens "$OUT" "$CKPT" "$GOLD" --size "$OPT_SIZE"; then
  verdict PASS goldens "$GOLD/trt_inputs.json, trt_reference_outputs.json"
else
  verdict FAIL goldens "could not write the Polygraphy goldens (see $LOGS/goldens.log)"
fi
# Polygraphy's check: median |engine - PyTorch fp32| <= a fraction of max|reference| per export dtype.
ATOL="$("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print({'fp32':1e-4,'fp16':1e-2,'bf16':3e-2}[s['dtype']]*s['max_abs_reference'])" "$GOLD/scale.json" 2>/dev/null || echo 0.05)"
BUILT=0
if run_step build "$LOGS/build.log" "$PY" tools/gpu_check.py build "$OUT" --plugin-impl "$PLUGIN_IMPL"; then
  verdict PASS "tensorrt build" "$(grep -E 'build took' "$LOGS/build.log" | tail -1)"
  BUILT=1
else
  verdict FAIL "tensorrt build" "build_engines failed (see $LOGS/build.log)"
fi
if [[ -f "$GOLD/trt_inputs.json" && $BUILT == 1 ]]; then
  if run_step polygraphy-engine "$LOGS/polygraphy_engine.log" "$PY" tools/gpu_check.py polygraphy-engine "$OUT" \
       "$GOLD/trt_inputs.json" "$GOLD/trt_reference_outputs.json" --atol "$ATOL"; then
    verdict PASS polygraphy "the refit engine matches PyTorch (median err <= $ATOL)"
  else
    verdict FAIL polygraphy "see $LOGS/polygraphy_engine.log"
  fi
  if run_step bench "$LOGS/bench.log" "$PY" tools/gpu_check.py bench "$OUT" "$CKPT" --iters 10; then
    verdict PASS timing "$LOGS/bench.log"
  else
    verdict FAIL timing "a backend disagrees with eager or failed (see $LOGS/bench.log)"
  fi
else
  verdict SKIP polygraphy "no engine or no goldens"
  verdict SKIP timing "no engine"
fi

# ---- 10. a LoRA applied at load time: TensorRT refit through the engine's name map ----------------------------------
if [[ "$BUILT" == 1 ]]; then
  if run_step lora "$LOGS/lora.log" "$PY" tools/gpu_check.py lora "$OUT" "$CKPT"; then
    verdict PASS "lora (trt refit)" "$(grep -E '^refit' "$LOGS/lora.log" | tail -1)"
  else
    verdict FAIL "lora (trt refit)" "see $LOGS/lora.log"
  fi
else
  verdict SKIP "lora (trt refit)" "no engine (the build failed)"
fi

summary
