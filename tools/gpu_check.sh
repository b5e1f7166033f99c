#!/usr/bin/env bash
# One-command GPU check of the TensorRT path, for one H100/H200 (about 10 minutes with the `small` preset,
# most of it the first install). Idempotent: re-running reuses the environment, checkpoint, export and
# engines when they are up to date.
#
#   tools/gpu_check.sh                 # venv in out/gpu_check/venv (or the active venv), preset small
#   SKIP_POLYGRAPHY_ONNX=1 tools/gpu_check.sh      # skip Polygraphy's own build from the ONNX (saves a build)
#   PRESET=tiny tools/gpu_check.sh     # faster, less representative
#   HIDREAM_USE_CURRENT_ENV=1 tools/gpu_check.sh   # use the current python, install into it
#
# Steps (each prints a PASS/FAIL/SKIP verdict line; the summary repeats them; exit 1 if any FAIL):
#   1. environment: venv + pip install -e '.[export,kernels,gpu]'      2. hidream-export doctor
#   3. small random checkpoint (tools/make_tiny_checkpoint.py --full)   4. export, plugin MoE lowering, bf16
#   5. hidream-export compare (ONNX Runtime vs PyTorch; saves inputs.json / reference_outputs.json)
#   6. TensorRT engines (build_engines: weight-stripped + refit transformer, HiDreamMoE plugin)
#   7. Polygraphy: `polygraphy run model.trt.onnx --trt` and `polygraphy run <engine> --model-type engine`
#      against the saved PyTorch outputs, with the Python plugin registered (tools/gpu_check.py)
#   8. Triton kernel tests on the GPU (pytest tests/test_moe_triton.py, TRITON_INTERPRET unset)
#   9. timing table: PyTorch eager bf16 vs the `triton` lowering vs the TensorRT engine, per step
#  10. a LoRA applied at load time: the engine refit through its name map vs PyTorch with the LoRA fused,
#      and refit back to the folder's weights (tools/gpu_check.py lora)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${HIDREAM_GPU_CHECK_DIR:-$REPO/out/gpu_check}"  # out/ is git-ignored
PRESET="${PRESET:-small}"
VARIANT="${VARIANT:-full}"
DTYPE="${DTYPE:-bf16}"
PLUGIN_IMPL="${PLUGIN_IMPL:-jit}"
CKPT="$WORK/ckpt-$PRESET-$VARIANT"
OUT="$WORK/engines/$VARIANT"
GOLD="$WORK/golden"
LOGS="$WORK/logs"
mkdir -p "$WORK" "$LOGS"
cd "$REPO" || exit 2

declare -a VERDICTS=()
FAILED=0
verdict() {  # verdict PASS|FAIL|SKIP NAME REASON...
  local status="$1" name="$2"; shift 2
  local line; line="$(printf '%-4s  %-30s %s' "$status" "$name" "$*")"
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
  echo "==================== gpu_check summary ($PRESET, $VARIANT, $DTYPE, plugin $PLUGIN_IMPL) ===================="
  printf '%s\n' "${VERDICTS[@]}"
  [[ -f "$LOGS/bench.log" ]] && grep '^|' "$LOGS/bench.log"
  echo "work dir: $WORK"
  exit "$FAILED"
}

# ---- 0. a GPU? -------------------------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  verdict SKIP gpu "no NVIDIA GPU or driver (nvidia-smi missing or failing): nothing to check here"
  summary
fi
verdict PASS gpu "$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -1)"

# ---- 1. environment --------------------------------------------------------------------------------------------
if [[ -n "${VIRTUAL_ENV:-}" || "${HIDREAM_USE_CURRENT_ENV:-0}" == "1" ]]; then
  PY="$(command -v python || command -v python3)"
else
  if [[ ! -x "$WORK/venv/bin/python" ]]; then
    python3 -m venv "$WORK/venv" || { verdict FAIL environment "cannot create $WORK/venv"; summary; }
  fi
  PY="$WORK/venv/bin/python"
fi
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH"
STAMP="$WORK/.installed-$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)-$(basename "$(dirname "$BIN")")"
if [[ ! -f "$STAMP" ]]; then
  if run_step install "$LOGS/install.log" "$PY" -m pip install --upgrade -e "$REPO[export,kernels,gpu]" pytest ml_dtypes; then
    touch "$STAMP"
  else
    verdict FAIL environment "pip install -e '.[export,kernels,gpu]' failed (see $LOGS/install.log)"
    summary
  fi
fi
if "$PY" -m pip list 2>/dev/null | grep -qE '^onnxruntime ' && "$PY" -m pip list 2>/dev/null | grep -qE '^onnxruntime-gpu '; then
  verdict PASS environment "installed; WARNING: both onnxruntime and onnxruntime-gpu present (they share one import name)"
else
  verdict PASS environment "$("$PY" --version) in $(dirname "$BIN")"
fi

# ---- 2. doctor ---------------------------------------------------------------------------------------------------
run_step doctor "$LOGS/doctor.log" "$PY" -m hidream_export.doctor
if "$PY" - <<'EOF'
import sys
from hidream_export import doctor
r = doctor.tensorrt_skip_reason()
print(r or "TensorRT engines can be built here")
sys.exit(1 if r else 0)
EOF
then
  verdict PASS doctor "TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)'), GPU visible"
else
  verdict FAIL doctor "TensorRT cannot build engines here (see $LOGS/doctor.log)"
  summary
fi

# ---- 3. checkpoint -------------------------------------------------------------------------------------------------
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

# ---- 4. export ---------------------------------------------------------------------------------------------------
if run_step export "$LOGS/export.log" "$BIN/hidream-export" export "$CKPT" --variant "$VARIANT" --out "$OUT" \
     --moe plugin --dtype "$DTYPE"; then
  verdict PASS export "$OUT/transformer/model.onnx (plugin MoE, $DTYPE)"
else
  verdict FAIL export "hidream-export export failed (see $LOGS/export.log)"
  summary
fi

# ---- 5. compare (ORT vs PyTorch) and the goldens -----------------------------------------------------------------
mkdir -p "$GOLD"
OPT_SIZE="$("$PY" -c "import json,sys; e=json.load(open(sys.argv[1]))['components']['transformer']; print('%dx%d' % tuple(e['size_range']['opt']))" "$OUT/manifest.json")"
if run_step compare "$LOGS/compare.log" "$BIN/hidream-export" compare "$CKPT" "$OUT/transformer/model.onnx" \
     --sizes "$OPT_SIZE" --save-dir "$GOLD"; then
  verdict PASS "compare (onnxruntime)" "ONNX Runtime matches PyTorch at $OPT_SIZE"
else
  verdict FAIL "compare (onnxruntime)" "ONNX Runtime vs PyTorch out of tolerance or failed (see $LOGS/compare.log)"
fi
if run_step goldens "$LOGS/goldens.log" "$PY" tools/gpu_check.py goldens "$OUT" "$CKPT" "$GOLD" --size "$OPT_SIZE"; then
  verdict PASS goldens "$GOLD/trt_inputs.json, trt_reference_outputs.json"
else
  verdict FAIL goldens "could not write the Polygraphy goldens (see $LOGS/goldens.log)"
fi
# Polygraphy's check: median |engine - PyTorch fp32| <= a fraction of max|reference| per export dtype.
ATOL="$("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print({'fp32':1e-4,'fp16':1e-2,'bf16':3e-2}[s['dtype']]*s['max_abs_reference'])" "$GOLD/scale.json" 2>/dev/null || echo 0.05)"

# ---- 6. TensorRT engines ------------------------------------------------------------------------------------------
if run_step build "$LOGS/build.log" "$PY" tools/gpu_check.py build "$OUT" --plugin-impl "$PLUGIN_IMPL"; then
  verdict PASS "tensorrt build" "$(grep -E 'build took' "$LOGS/build.log" | tail -1)"
  BUILT=1
else
  verdict FAIL "tensorrt build" "build_engines failed (see $LOGS/build.log)"
  BUILT=0
fi

# ---- 7. Polygraphy against the PyTorch goldens --------------------------------------------------------------------
if [[ -f "$GOLD/trt_inputs.json" ]]; then
  if [[ "${SKIP_POLYGRAPHY_ONNX:-0}" == "1" ]]; then
    verdict SKIP "polygraphy (onnx --trt)" "SKIP_POLYGRAPHY_ONNX=1"
  elif run_step polygraphy-onnx "$LOGS/polygraphy_onnx.log" "$PY" tools/gpu_check.py polygraphy-onnx "$OUT" \
       "$GOLD/trt_inputs.json" "$GOLD/trt_reference_outputs.json" --atol "$ATOL"; then
    verdict PASS "polygraphy (onnx --trt)" "parser + plugin + builder match PyTorch (median err <= $ATOL)"
  else
    verdict FAIL "polygraphy (onnx --trt)" "see $LOGS/polygraphy_onnx.log"
  fi
  if [[ "$BUILT" == 1 ]]; then
    if run_step polygraphy-engine "$LOGS/polygraphy_engine.log" "$PY" tools/gpu_check.py polygraphy-engine "$OUT" \
         "$GOLD/trt_inputs.json" "$GOLD/trt_reference_outputs.json" --atol "$ATOL"; then
      verdict PASS "polygraphy (engine)" "the refit engine matches PyTorch (median err <= $ATOL)"
    else
      verdict FAIL "polygraphy (engine)" "see $LOGS/polygraphy_engine.log"
    fi
  else
    verdict SKIP "polygraphy (engine)" "no engine (the build failed)"
  fi
else
  verdict SKIP polygraphy "no goldens"
fi

# ---- 8. Triton kernel tests on the GPU ----------------------------------------------------------------------------
if (unset TRITON_INTERPRET; run_step triton-tests "$LOGS/triton_tests.log" "$PY" -m pytest tests/test_moe_triton.py -q -rs); then
  verdict PASS "triton kernels (gpu)" "$(grep -E 'passed|failed' "$LOGS/triton_tests.log" | tail -1)"
else
  verdict FAIL "triton kernels (gpu)" "$(grep -E 'passed|failed|error' "$LOGS/triton_tests.log" | tail -1)"
fi

# ---- 9. timing ------------------------------------------------------------------------------------------------------
if [[ "$BUILT" == 1 ]]; then
  if run_step bench "$LOGS/bench.log" "$PY" tools/gpu_check.py bench "$OUT" "$CKPT" --iters 10; then
    verdict PASS timing "table below (every backend's output has cosine >= 0.99 with eager)"
  else
    verdict FAIL timing "a backend disagrees with eager or failed (see $LOGS/bench.log)"
  fi
else
  verdict SKIP timing "no engine (the build failed)"
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
