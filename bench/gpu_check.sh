#!/usr/bin/env bash
# The GPU acceptance run: the GPU tests and the GPU benchmarks of diffusionGPT in one command on a CUDA
# machine, recorded to OUT_DIR as gpu_check.json + gpu_check.md (+ raw.tar.gz: every log and raw JSON).
# Each step runs under `timeout`; a failed or timed-out step is recorded and the next one runs.
#
#   bash bench/gpu_check.sh OUT_DIR                 # on the GPU machine
#   bash bench/gpu_check.sh --prepare [DIR]         # optional, where there is network: an offline bundle for
#                                                   #   air-gapped machines (wheels, GPT-2 BPE data, the
#                                                   #   quickstart models) -> .gpu_check/, carried beside the code
#   bash bench/gpu_check.sh --dry-run OUT_DIR       # CPU: every step's plumbing, tiny, Triton in the interpreter (CI)
#   bash bench/gpu_check.sh --only attention,training OUT_DIR   # some steps again
#
# Steps, in order (each with a default time limit; no step starts after GPU_CHECK_TOTAL_S seconds):
#   env          Python, torch, CUDA, Triton, GPU, DeepSpeed (bundled wheels installed into a temp path), data
#   gpu-tests    the GPU-only tests (bf16 kernels, compiled kernels, long sequences) + the first-use check tests
#   guard        the first-use check (kernels/attention.py) of every mask kind in bf16 (d 64, 128), fp32, fp16
#   multi-gpu    python -m bench.multi_gpu_check: DeepSpeed ZeRO-2 bf16 on 2 GPUs (NCCL), resumed on 1 GPU; with
#                one GPU the same on one (the 2-GPU part recorded as not run)
#   launch       python -m bench.gpu_check launch: attention with batch x heads > 65,535 vs the reference; with two
#                GPUs, the kernels, the model's logits and inference.sample on cuda:1 (from a fresh thread) vs cuda:0
#   attention    python -m bench.attention_bench: Triton vs SDPA flash vs FlexAttention, T 1k/4k/8k, d 64/128
#   masking      python -m bench.masking_bench: fused masking kernel vs the PyTorch reference, GB/s
#   training     python -m bench.training: GPT-2 124M, bf16, --compile, ZeRO-0/2, Triton vs attn_impl=torch,
#                on GPT-2 BPE Shakespeare, tokens/s and MFU
#   decoding     python -m bench.decoding --random_init: tokens/s per rule, KV cache on/off
#   serving      python -m bench.serve_load on the MDLM quickstart model (bundled export): the official openai
#                client at concurrency 1/4/16/64, tokens/s vs one at a time
#   serving-ar   the same on the AR quickstart model
#   kernel-tests the whole kernel test files (tests/test_attention_kernel.py, tests/test_masking_kernel.py)
#   kernel-compile  python -m bench.kernel_compile: every kernel, dtype, mask and config the pruner keeps, compiled
#                for sm_80 and sm_90 (no GPU needed): each case keeps a config without spills that fits
#
# Options / environment:
#   --wheels DIR       wheels to install first (default .gpu_check/wheels): `pip install --no-index --no-deps
#                      --target TMP` + PYTHONPATH, nothing is installed into the image
#   --data DIR         prepared GPT-2 BPE dataset for the training step (default .gpu_check/data/shakespeare)
#   --models DIR       the quickstart models' exports for the serving steps (default .gpu_check/models)
#   --only a,b         run only these steps (env always runs)
#   PYTHON             interpreter (default .venv/bin/python when there is one, else python3)
#   GPU_CHECK_TOTAL_S  no step starts after this many seconds (default 450)
#   GPU_CHECK_BUDGET_<STEP>  one step's time limit in seconds (e.g. GPU_CHECK_BUDGET_TRAINING=120)
#   GPU_CHECK_DIR      the bundle folder (default .gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

usage() { sed -n '2,42p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
DRY=0; PREPARE=0; ONLY=""; OUT_DIR=""
CARRY_DIR="${GPU_CHECK_DIR:-.gpu_check}"
WHEELS=""; DATA=""; MODELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --dry-run|--dry_run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    --wheels) WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#*=}" ;;
    --data) DATA="$2"; shift ;;
    --data=*) DATA="${1#*=}" ;;
    --models) MODELS="$2"; shift ;;
    --models=*) MODELS="${1#*=}" ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$OUT_DIR" ] || { echo "gpu_check.sh: one OUT_DIR only" >&2; exit 2; }; OUT_DIR="$1" ;;
  esac
  shift
done
WHEELS_GIVEN="$WHEELS"
WHEELS="${WHEELS:-$CARRY_DIR/wheels}"
DATA_GIVEN="$DATA"
DATA="${DATA:-$CARRY_DIR/data/shakespeare}"
MODELS="${MODELS:-$CARRY_DIR/models}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# ------------------------------------------------------------------------------------------ --prepare (here)
if [ "$PREPARE" = 1 ]; then
  exec "$PYTHON" -m bench.gpu_check prepare "${OUT_DIR:-$CARRY_DIR}"
fi

[ -n "$OUT_DIR" ] || { echo "gpu_check.sh: give OUT_DIR (bash bench/gpu_check.sh OUT_DIR)" >&2; usage 2; }
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RAW="$WORK/raw"; mkdir -p "$RAW"
STEPS="$RAW/steps.tsv"; : > "$STEPS"
T0=$(date +%s)
TOTAL="${GPU_CHECK_TOTAL_S:-450}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  MODE="dry-run (CPU, tiny shapes, Triton in the interpreter: plumbing only, no number means anything)"
else
  MODE="gpu"
fi
echo "== gpu_check: $MODE; output $OUT_DIR; work $WORK; python $PYTHON"

# carried wheels -> a temporary site dir first on PYTHONPATH (nothing is installed into the image)
# (a dry run installs only wheels it is given: the prepared binary ones are cp312 wheels)
if { [ "$DRY" = 0 ] || [ -n "$WHEELS_GIVEN" ]; } && compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== installing carried wheels from $WHEELS into $WORK/site"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$WORK/site" "$WHEELS"/*.whl > "$RAW/wheels.log" 2>&1; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    ls "$WHEELS"/*.whl | xargs -n1 basename > "$RAW/wheels.txt"
  else
    echo "!! installing the wheels failed (see raw/wheels.log); going on without them" >&2
    tail -5 "$RAW/wheels.log" >&2
  fi
fi

if [ "$DRY" = 1 ] && [ -z "$DATA_GIVEN" ] && [ ! -f "$DATA/meta.json" ]; then
  DATA="$WORK/data"  # the dry run prepares the (char) corpus itself: seconds
  "$PYTHON" -m training.prepare --source shakespeare --tokenizer char --out "$DATA" > "$RAW/prepare.log" 2>&1 \
    || echo "!! preparing dry-run data failed (raw/prepare.log)" >&2
fi

report() {  # rewrite gpu_check.json / .md and raw.tar.gz from what is there now
  "$PYTHON" -m bench.gpu_check report "$RAW" "$OUT_DIR" --mode "$MODE" --elapsed "$(( $(date +%s) - T0 ))" \
    > "$RAW/report.log" 2>&1 || { echo "!! the report failed:" >&2; tail -20 "$RAW/report.log" >&2; }
  tar -czf "$OUT_DIR/raw.tar.gz" -C "$WORK" raw 2>/dev/null
}

wanted() { [ -z "$ONLY" ] || [ "$1" = env ] || [[ ",$ONLY," == *",$1,"* ]]; }

# step NAME BUDGET_S CMD...: run under timeout (capped by what is left of TOTAL), log, record, report
step() {
  local name=$1 budget=$2; shift 2
  wanted "$name" || return 0
  local var="GPU_CHECK_BUDGET_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  budget="${!var:-$budget}"
  local left=$(( TOTAL - ($(date +%s) - T0) ))
  local limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: not run (out of time: ${left}s of ${TOTAL}s left)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$budget" "$*" >> "$STEPS"
    report; return 0
  fi
  echo "== $name (timeout ${limit}s): $*"
  local s0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$RAW/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - s0 ))
  if [ $rc -eq 0 ]; then echo "   ok in ${secs}s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!! $name TIMED OUT after ${secs}s (rc $rc); last lines:"; tail -15 "$RAW/$name.log"
  else echo "!! $name FAILED (rc $rc) after ${secs}s; last lines:"; tail -15 "$RAW/$name.log"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$*" >> "$STEPS"
  report
  return 0
}

PY="$PYTHON"
XDIST=()
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 12); fi  # Triton compiles in parallel
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfEs)

if [ "$DRY" = 1 ]; then
  step env 30 "$PY" -m bench.gpu_check env "$RAW/env.json" --data "$DATA" --dry-run
  # the GPU-only tests skip here; one first-use check test runs to show the report counts passes (the test
  # suite runs them all)
  step gpu-tests 60 "${PYTEST[@]}" tests/test_kernel_guard.py tests/test_attention_kernel.py tests/test_masking_kernel.py \
       -k "on_gpu or a_correct_masking_kernel_passes" --junitxml "$RAW/gpu-tests.xml"
  step guard 30 "$PY" -m bench.gpu_check guard "$RAW/guard.json" --dry-run
  step multi-gpu 150 "$PY" -m bench.multi_gpu_check "$RAW/multi-gpu.json" --data "$DATA" --dry-run
  step launch 60 "$PY" -m bench.gpu_check launch "$RAW/launch.json" --dry-run
  step attention 60 "$PY" -m bench.attention_bench --device cpu --tiny --json "$RAW/attention.json"
  step masking 30 "$PY" -m bench.masking_bench --device cpu --tiny --json "$RAW/masking.json"
  step training 90 "$PY" -m bench.training --config training/configs/tiny_test.json --data_dir "$DATA" --from_data \
       --stages 0,2 --attn_impls triton,torch --no_plain --steps 2 --rounds 1 --warmup 1 --json "$RAW/training.json"
  step decoding 60 "$PY" -m bench.decoding --random_init --device cpu --threads 1 --gen_length 8 --num_prompts 2 \
       --samples_per_prompt 1 --batch_size 2 --out "$RAW/decoding.json"
  # a tiny MDLM export the tests keep (tests/fixtures): a few requests, two concurrencies, the real server
  step serving 90 "$PY" -m bench.serve_load --ckpt tests/fixtures/pre_restructure/export --requests 6 \
       --concurrency 1 2 --rounds 2 --max_seconds 60 --out "$RAW/serving.json"
  step kernel-tests 60 "${PYTEST[@]}" tests/test_masking_kernel.py --junitxml "$RAW/kernel-tests.xml"
  # the masking kernel only: tests/test_attention_kernel.py compiles the representative attention cases
  step kernel-compile 60 "$PY" -m bench.kernel_compile --subset --kernels masking --jobs 1 --json "$RAW/kernel-compile.json"
else
  step env 30 "$PY" -m bench.gpu_check env "$RAW/env.json" --data "$DATA"
  if [ -z "$ONLY" ] && ! grep -q '"cuda_available": true' "$RAW/env.json" 2>/dev/null; then
    echo "!! no CUDA GPU (see raw/env.log): nothing else can run here. On a CPU machine use --dry-run." >&2
    report; echo "== report: $OUT_DIR/gpu_check.md"; exit 1
  fi
  step gpu-tests 60 "${PYTEST[@]}" "${XDIST[@]}" tests/test_kernel_guard.py tests/test_attention_kernel.py \
       tests/test_masking_kernel.py -k "on_gpu or guard or kernel_guard" --junitxml "$RAW/gpu-tests.xml"
  step guard 30 "$PY" -m bench.gpu_check guard "$RAW/guard.json"
  step multi-gpu 90 "$PY" -m bench.multi_gpu_check "$RAW/multi-gpu.json" --data "$DATA"
  step launch 60 "$PY" -m bench.gpu_check launch "$RAW/launch.json"
  step attention 75 "$PY" -m bench.attention_bench --json "$RAW/attention.json" --time_budget 65 --warmup_ms 10 --rep_ms 40
  step masking 15 "$PY" -m bench.masking_bench --json "$RAW/masking.json"
  step training 100 "$PY" -m bench.training --config training/configs/train_gpt2.json --data_dir "$DATA" --from_data \
       --dtype=bf16 --compile --stages 0,2 --attn_impls auto,torch --no_plain --batch_size 12 \
       --steps 50 --rounds 3 --warmup 3 --json "$RAW/training.json"
  step decoding 30 "$PY" -m bench.decoding --random_init --device cuda --gen_length 128 --batch_size 16 \
       --samples_per_prompt 2 --out "$RAW/decoding.json"
  step serving 90 "$PY" -m bench.serve_load --ckpt "$MODELS/shakespeare_mdlm" --requests 200 \
       --concurrency 1 4 16 64 --max_seconds 20 --out "$RAW/serving.json"
  step serving-ar 60 "$PY" -m bench.serve_load --ckpt "$MODELS/shakespeare_ar" --requests 200 \
       --concurrency 1 16 --max_seconds 15 --out "$RAW/serving-ar.json"
  step kernel-tests 120 "${PYTEST[@]}" "${XDIST[@]}" tests/test_attention_kernel.py tests/test_masking_kernel.py \
       --junitxml "$RAW/kernel-tests.xml"
  # needs no GPU (~7 min on 2 cores, about one on 16): last, with whatever time is left
  step kernel-compile 120 "$PY" -m bench.kernel_compile --json "$RAW/kernel-compile.json"
fi
report
FAILED=$(awk -F'\t' '$2 != "0" && $2 != "skipped" {printf "%s ", $1}' "$STEPS")
echo "== done in $(( $(date +%s) - T0 ))s: $OUT_DIR/gpu_check.md, gpu_check.json, raw.tar.gz"
rm -rf "$WORK"
if [ -n "$FAILED" ]; then
  echo "!! FAILED or timed out: $FAILED(see gpu_check.md)" >&2
  exit 1
fi
echo "== every step passed"
