#!/usr/bin/env bash
# The quickstart: prepare Shakespeare (char-level), train a small masked-diffusion model with DeepSpeed,
# export it and print samples.  `bash launch.sh` needs nothing else; everything below is a knob.
#
#   bash launch.sh                                   # MDLM, ZeRO-2, 2 CPU ranks (or every GPU), ~4 min on CPU
#   ZERO=3 NPROC=4 bash launch.sh                    # another ZeRO stage / number of ranks
#   ZERO=ds_configs/zero3_offload.json bash launch.sh
#   CONFIG=training/configs/shakespeare_ar.json OUT_DIR=out/shakespeare_ar bash launch.sh   # AR baseline
#   MAX_ITERS=100 bash launch.sh --eval_interval=50  # extra arguments go to training/pretrain.py
#   bash launch.sh                                   # again: continues the run in OUT_DIR (--resume is added)
#   bash launch.sh --overwrite                       # discards the run in OUT_DIR and trains a new one
#   HOSTFILE=hosts bash launch.sh                    # every host/GPU listed in a DeepSpeed hostfile
#
# Environment knobs (all optional):
#   CONFIG     training config          (default training/configs/shakespeare_mdlm.json)
#   ZERO       0 | 1 | 2 | 3 | 3_offload | path/to/ds.json   (default 2)
#   NPROC      ranks on this machine     (default: every GPU, or 2 on a CPU-only machine)
#   HOSTFILE   DeepSpeed hostfile for multi-node runs (checked first: it must exist and parse, NPROC if
#              given must equal its slots, every node must answer passwordless ssh)
#   MASTER_ADDR  address of the first node that the others reach it at (multi-node; default: DeepSpeed
#              asks the first node for `hostname -I`)
#   OUT_DIR    run directory             (default: the config's out_dir)
#   DATA_DIR   prepared dataset          (default: the config's data_dir; prepared here if missing)
#   MAX_ITERS  optimizer steps           (default: the config's max_iters)
#   TOKENIZER  char | gpt2, used only when DATA_DIR must be prepared (default char)
#   SAMPLES    samples to print at the end (default 3; 0 skips sampling)
set -euo pipefail
cd "$(dirname "$0")"

# a fresh clone: create the project's virtualenv first (once), unless this Python already has everything
if [ ! -x .venv/bin/python ] && ! python3 -c "import deepspeed, torch, tiktoken" 2>/dev/null; then
  command -v make >/dev/null || { echo "launch.sh: no .venv and no 'make': run 'python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt'" >&2; exit 2; }
  echo "== first run: installing the pinned dependencies into .venv (make install; a few minutes, once)"
  make install
fi
BIN=""
if [ -x .venv/bin/python ]; then BIN=".venv/bin/"; fi  # the project's virtualenv, when there is one
PY="${BIN}python"
DEEPSPEED="${BIN}deepspeed"
command -v "$DEEPSPEED" >/dev/null || DEEPSPEED="deepspeed"

CONFIG="${CONFIG:-training/configs/shakespeare_mdlm.json}"
ZERO="${ZERO:-2}"
SAMPLES="${SAMPLES:-3}"
case "$ZERO" in
  0|1|2|3|3_offload) DS_CONFIG="ds_configs/zero${ZERO}.json" ;;
  *) DS_CONFIG="$ZERO" ;;
esac
[ -f "$DS_CONFIG" ] || { echo "launch.sh: ZERO=$ZERO: DeepSpeed config $DS_CONFIG not found (ZERO=0..3, 3_offload or a path)" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "launch.sh: training config $CONFIG not found" >&2; exit 2; }

# a value from the training config, unless the environment overrides it
# out_dir and data_dir through the one config loader: a bad config file stops here, its message naming it;
# the same Python (torch is imported by then) counts the GPUs
CONFIG_DIRS=$("$PY" - "$CONFIG" <<'EOF'
import sys
from training.config import load_config
try:
    cfg, _ = load_config(sys.argv[1])
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"launch.sh: CONFIG={sys.argv[1]}: {e}")
import torch
print(cfg.out_dir)
print(cfg.data_dir)
print(torch.cuda.device_count())
EOF
) || exit 2
OUT_DIR="${OUT_DIR:-$(sed -n 1p <<<"$CONFIG_DIRS")}"
DATA_DIR="${DATA_DIR:-$(sed -n 2p <<<"$CONFIG_DIRS")}"
NUM_GPUS=$(sed -n 3p <<<"$CONFIG_DIRS")

NPROC_GIVEN="${NPROC:-}"
if [ -n "${HOSTFILE:-}" ]; then
  # DeepSpeed would train on this machine alone after one warning line for a missing file, and only tries
  # ssh on the first node: refuse a bad hostfile, NPROC against its slots, and unreachable nodes here,
  # before anything is prepared or started
  "$PY" -m training.hostfile "$HOSTFILE" ${NPROC_GIVEN:+--num_gpus "$NPROC_GIVEN"} >/dev/null \
    || { echo "launch.sh: HOSTFILE=$HOSTFILE refused (above)" >&2; exit 2; }
fi

# ---------------------------------------------------------------- devices
if [ "$NUM_GPUS" -gt 0 ]; then
  NPROC="${NPROC:-$NUM_GPUS}"
else
  # 2 ranks x 1 thread: as fast as 1 rank x 2 threads on 2 cores (26,385 vs 26,459 tokens/s, within noise;
  # python -m bench.cpu_ranks) and it exercises ZeRO's data parallelism; NPROC=1 gives one rank every core
  NPROC="${NPROC:-2}"
  # DeepSpeed's launcher counts NUMA nodes, not cores, on CPU: say it plainly, and give each rank
  # its share of the cores (more threads than cores makes step times swing 10x)
  export DS_ACCELERATOR=cpu
  CORES=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
fi
# the shm communication op DeepSpeed builds on CPU (~40 s) is cached here and built only once
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

# ---------------------------------------------------------------- data
if [ ! -f "$DATA_DIR/meta.json" ]; then
  TOKENIZER="${TOKENIZER:-char}"
  echo "== preparing Shakespeare ($TOKENIZER tokenizer) into $DATA_DIR"
  "$PY" -m training.prepare --source shakespeare --tokenizer "$TOKENIZER" --out "$DATA_DIR"
fi

# ---------------------------------------------------------------- train
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
if [ -n "${HOSTFILE:-}" ]; then
  export HOSTFILE  # pretrain.py warns when only one node joined
  LAUNCH=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_port "$PORT")
  [ -n "${MASTER_ADDR:-}" ] && LAUNCH+=(--master_addr "$MASTER_ADDR")
  [ -n "$NPROC_GIVEN" ] && LAUNCH+=(--num_gpus "$NPROC_GIVEN")
else
  LAUNCH=("$DEEPSPEED" --num_gpus "$NPROC" --master_port "$PORT")
fi
ARGS=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --out_dir "$OUT_DIR" --data_dir "$DATA_DIR")
[ -n "${MAX_ITERS:-}" ] && ARGS+=(--max_iters "$MAX_ITERS")
# another run training into OUT_DIR: stop before touching its train.log (pretrain.py holds the lock itself)
"$PY" -m training.run_lock "$OUT_DIR" || exit 1
# A second `bash launch.sh` on the same OUT_DIR continues the run there (--resume): a finished run is
# exported and sampled again (no step to train), an interrupted one trains on, a larger MAX_ITERS extends it.
# pretrain.py refuses a new run over an earlier one; --overwrite (given here) discards it and starts anew.
case " $* " in
  *" --resume"*|*" --overwrite"*) ;;
  *) TAG=$(cat "$OUT_DIR/ckpt/latest" 2>/dev/null || true)
     if [ -n "$TAG" ] && [ -f "$OUT_DIR/ckpt/$TAG/manifest.json" ]; then
       echo "== $OUT_DIR holds a run (checkpoint $TAG): continuing it with --resume" \
            "(a new run: OUT_DIR=NEW_DIR bash launch.sh, or bash launch.sh --overwrite to discard this one)"
       ARGS+=(--resume)
     fi ;;
esac
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/train.log"
echo "== training: ${LAUNCH[*]} training/pretrain.py ${ARGS[*]} $*"
echo "   (ZeRO config $DS_CONFIG, log $LOG)"
# train.log is appended to, never replaced: a resumed run's log follows the log of the run it continues.
# What this launch adds (its log bytes, its metrics records) is told apart from earlier launches' by where
# it starts (--overwrite: pretrain.py removes metrics.jsonl, so this launch's records start at 0).
printf '\n== %s: bash launch.sh %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >> "$LOG"
LOG_START=$(( $(stat -c %s "$LOG") + 1 ))
RECORDS_BEFORE=0
case " $* " in
  *" --overwrite"*) ;;
  *) RECORDS_BEFORE=$("$PY" -c "import sys; from common.jsonl import read_jsonl; print(len(read_jsonl(sys.argv[1])))" \
       "$OUT_DIR/metrics.jsonl") ;;
esac
# The launcher gets a process group of its own (setsid), so SIGTERM or SIGINT (Ctrl-C) to launch.sh reaches
# every rank as one SIGTERM to that group: the ranks finish their step, write a checkpoint and exit. A second
# signal sends SIGKILL (the last verified checkpoint stays good). tee ignores both and ends with the log.
exec 3> >(trap '' INT TERM; exec tee -a "$LOG")
TEE_PID=$!
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
set +e
"${SETSID[@]}" "${LAUNCH[@]}" training/pretrain.py "${ARGS[@]}" "$@" >&3 2>&3 &
TRAIN_PID=$!
SIGNALS=0
stop_training() {
  SIGNALS=$((SIGNALS + 1))
  local how=TERM what="the ranks write a checkpoint and exit; a second signal kills them"
  [ "$SIGNALS" -gt 1 ] && how=KILL what="killed; the last verified checkpoint is kept"
  echo "launch.sh: $1: SIG$how to the training processes ($what)" >&2
  if [ ${#SETSID[@]} -gt 0 ]; then kill -s "$how" -- "-$TRAIN_PID" 2>/dev/null; else kill -s "$how" "$TRAIN_PID" 2>/dev/null; fi
}
trap 'stop_training SIGTERM' TERM
trap 'stop_training SIGINT' INT
while :; do
  wait "$TRAIN_PID"
  RC=$?
  kill -0 "$TRAIN_PID" 2>/dev/null || break  # wait also returns when a trapped signal arrives
done
trap - TERM INT
exec 3>&-
wait "$TEE_PID" 2>/dev/null
set -e

# Success is the run's own "done" record (written after the final checkpoint and export), not only the
# exit code: one CPU run in ~100 has been seen to abort in process teardown after finishing, with
# "terminate called without an active exception". Only that exact case is forgiven.
LAST=$("$PY" - "$OUT_DIR/metrics.jsonl" "$RECORDS_BEFORE" <<'EOF'
import sys
from common.jsonl import read_jsonl  # skips a torn last line (a killed run, a full disk)
records = read_jsonl(sys.argv[1])[int(sys.argv[2]):]  # this launch's records only
print(records[-1].get("kind", "none") if records else "none")
EOF
)
if [ "$LAST" = "stopped" ]; then
  # the ranks saw SIGTERM (from here, or their launcher went away) and wrote a checkpoint
  echo "launch.sh: training stopped before the end by a signal, after writing a checkpoint; continue with: bash launch.sh --resume" >&2
  exit $(( SIGNALS > 0 ? 143 : 1 ))
elif [ "$RC" -ne 0 ]; then
  if [ "$LAST" = "done" ] && tail -c +"$LOG_START" "$LOG" | grep -q "terminate called without an active exception"; then
    echo "launch.sh: training finished (final checkpoint and export written) but a rank aborted at exit; ignoring" >&2
  else
    echo "launch.sh: training failed (exit code $RC); see $LOG" >&2
    exit "$RC"
  fi
elif [ "$LAST" != "done" ]; then
  echo "launch.sh: training stopped before the end; continue with: bash launch.sh --resume" >&2
  exit 1
fi

# ---------------------------------------------------------------- results
"$PY" - "$OUT_DIR" <<'EOF'
import json, math, sys
from pathlib import Path
from common.jsonl import read_jsonl  # skips a torn last line

def last_eval(out):
    evals = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r.get("kind") == "eval"]
    return evals[-1] if evals else None

out = sys.argv[1]
e = last_eval(out)
cfg = json.loads((Path(out) / "export" / "config.json").read_text()) if (Path(out) / "export" / "config.json").is_file() else {}
name = cfg.get("objective", {}).get("name", "?")
if e:
    what = "val NELBO (upper bound on NLL)" if e["val_ppl_is_bound"] else "val loss"
    print(f"== {out} ({name}, step {e['step']}): {what} {e['val_loss']:.3f} nats/token, "
          f"PPL {'<= ' if e['val_ppl_is_bound'] else ''}{e['val_ppl']:.2f}")
# the AR baseline of the same size, when it has been trained (CONFIG=training/configs/shakespeare_ar.json)
for other in ("out/shakespeare_ar",):
    o = last_eval(other)
    if o and Path(other).resolve() != Path(out).resolve():
        print(f"   AR baseline {other} (step {o['step']}): val loss {o['val_loss']:.3f} nats/token, PPL {o['val_ppl']:.2f}")
EOF

if [ "$SAMPLES" -gt 0 ]; then
  # as many new tokens as the context holds after the one-token prompt
  MAX_NEW=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['block_size'] - 1)" "$OUT_DIR/export/config.json")
  echo "== samples (python -m inference.sample --ckpt $OUT_DIR/export --max_new_tokens $MAX_NEW)"
  "$PY" -m inference.sample --ckpt "$OUT_DIR/export" --num_samples "$SAMPLES" --max_new_tokens "$MAX_NEW" \
    --start $'\n' --seed 1337 --no_progress
fi
