#!/usr/bin/env bash
# The GPU-relevant checks of mat_ds in one command (docs/gpu_check.md):
#
#     scripts/gpu_check.sh [--quick] [--out DIR] [-- extra tests/scripts/gpu_check.py flags]
#
# On a machine with >= 1 CUDA GPU it runs, through the deepspeed launcher on every visible GPU (one rank each):
#   1. tests/scripts/gpu_check.py: NCCL backend + mat_ds's collectives; frozen heads (and Switch experts) stay
#      bit-identical (weights, fp32 master, Adam moments) on ZeRO-2/ZeRO-3 in fp32/bf16/fp16; one refresh's time and
#      peak GPU memory at BERT-base size for mat.probe_gram = materialized / ghost / auto;
#   2. the trainer itself (python -m mat_ds.pretrain, tiny model, 20 steps, MAT on, bf16 ZeRO-2, --verify_frozen):
#      exit 0, finite losses, frozen heads' max |dW| exactly 0 on every step.
# Prints one summary table. Exit status: 0 all passed, 1 a check failed, 2 no CUDA GPU here (one line on stderr).
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3), GPU_CHECK_TIMEOUT (seconds per launch,
# default 1800), CUDA_VISIBLE_DEVICES (respected: the launcher then uses exactly those GPUs), GPU_CHECK_ALLOW_CPU=1
# (a dry run of this script on GPU_CHECK_CPU_RANKS=2 gloo ranks, to test the script itself on a CPU machine).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

QUICK=0
OUT="runs/gpu_check"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=$(command -v python3 || command -v python); fi

# -- is there a GPU at all? ------------------------------------------------------------------------------------------
DRY_RUN=0
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    # Testing this script itself on a CPU machine: the same pipeline on gloo ranks (fp16 cases run where DeepSpeed's
    # CPU accelerator reports fp16, get_accelerator().is_fp16_supported(), and are skipped, saying so, elsewhere).
    DRY_RUN=1
    NUM_GPUS=${GPU_CHECK_CPU_RANKS:-2}
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi not found); nothing to check - run it on a GPU machine" >&2
    exit 2
else
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    if [ "${NUM_GPUS:-0}" -lt 1 ]; then
        echo "gpu_check: no CUDA GPU on this machine (nvidia-smi -L lists none); nothing to check - run it on a GPU machine" >&2
        exit 2
    fi
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' \
            >/dev/null 2>&1; then
        echo "gpu_check: nvidia-smi lists $NUM_GPUS GPU(s) but torch ($PY) sees no CUDA device (CPU-only torch build or driver mismatch)" >&2
        exit 2
    fi
fi
DS="$(dirname "$PY")/deepspeed"
[ -x "$DS" ] || DS=deepspeed
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export WANDB_MODE=${WANDB_MODE:-disabled}
TIMEOUT=${GPU_CHECK_TIMEOUT:-1800}
TIMEOUT_CMD=()
command -v timeout >/dev/null 2>&1 && TIMEOUT_CMD=(timeout --kill-after=30 "$TIMEOUT")

# The launcher: one rank per visible GPU. A set CUDA_VISIBLE_DEVICES is honoured by DeepSpeed only without --num_gpus;
# a non-existent --hostfile keeps a cluster's /job/hostfile from turning this into a multi-node launch.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$DRY_RUN" = 0 ]; then
    RANKS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    GPU_ARGS=()
else
    RANKS=$NUM_GPUS
    GPU_ARGS=(--num_gpus "$NUM_GPUS")
fi
mkdir -p "$OUT"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() { "${TIMEOUT_CMD[@]}" "$DS" --hostfile "$OUT/.no_hostfile" "${GPU_ARGS[@]}" --master_port "$(free_port)" "$@"; }

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check: DRY RUN on CPU (GPU_CHECK_ALLOW_CPU=1), $RANKS gloo rank(s); logs and results in $OUT/"
else
    echo "gpu_check: $NUM_GPUS GPU(s) listed by nvidia-smi, $RANKS rank(s); logs and results in $OUT/"
    nvidia-smi -L | sed 's/^/gpu_check:   /'
fi

# -- 1. backend, frozen drift per stage/precision/family, refresh cost ------------------------------------------------
CHECK_ARGS=()
if [ "$QUICK" = 1 ]; then
    CHECK_ARGS=(--cases "own:2:bf16,own:3:fp16,switch:2:bf16" --bench_size tiny)
fi
[ "$DRY_RUN" = 1 ] && CHECK_ARGS+=(--allow_cpu)
rm -f "$OUT/gpu_check.jsonl" "$OUT/trainer.jsonl"
echo "gpu_check: [1/2] tests/scripts/gpu_check.py (log: $OUT/gpu_check.log)"
launch tests/scripts/gpu_check.py --out "$OUT/gpu_check.jsonl" "${CHECK_ARGS[@]}" "${EXTRA[@]}" \
    > "$OUT/gpu_check.log" 2>&1
RC1=$?
if [ ! -s "$OUT/gpu_check.jsonl" ]; then
    echo "{\"check\": \"gpu_check.py\", \"case\": \"launch\", \"ok\": false, \"detail\": \"exit $RC1 before writing results; see $OUT/gpu_check.log\"}" \
        > "$OUT/gpu_check.jsonl"
    tail -n 30 "$OUT/gpu_check.log" >&2
fi

# -- 2. the trainer on every GPU: MAT decisions broadcast over NCCL, frozen heads exactly frozen ------------------------
echo "gpu_check: [2/2] python -m mat_ds.pretrain, $RANKS rank(s), bf16 ZeRO-2 (log: $OUT/trainer.log)"
"$PY" - "$OUT/trainer_ds.json" <<'EOF'
import json, sys
cfg = json.load(open("configs/bert_mat_zero2.json"))
cfg["mat"].update(warmup_steps=5, refresh_interval=5, alpha=0.3, log_heatmap_interval=0)
cfg["scheduler"]["params"]["warmup_num_steps"] = 5
cfg["bf16"] = {"enabled": True}
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
EOF
rm -rf "$OUT/trainer"
launch --module mat_ds.pretrain --deepspeed_config "$OUT/trainer_ds.json" --n_layer 2 --n_head 4 --d_model 64 \
    --seq_len 64 --vocab_size 1024 --train_steps 20 --eval_interval 10 --save_interval 0 --resume never \
    --verify_frozen --out_dir "$OUT/trainer" > "$OUT/trainer.log" 2>&1
RC2=$?
"$PY" - "$OUT/trainer/metrics.jsonl" "$RC2" "$RANKS" "$OUT/trainer.log" > "$OUT/trainer.jsonl" <<'EOF'
import json, math, os, sys
path, rc, ranks, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
losses = [r["train/loss"] for r in rows if "train/loss" in r]
drift = [r["mat/frozen_max_abs_change"] for r in rows if "mat/frozen_max_abs_change" in r]
frozen = [r["mat/frozen_heads"] for r in rows if "mat/frozen_heads" in r]
ok = rc == 0 and len(losses) == 20 and all(math.isfinite(x) for x in losses) and all(d == 0.0 for d in drift)
detail = (f"exit {rc}, {len(losses)}/20 steps, loss {losses[0]:.3f}->{losses[-1]:.3f}, frozen heads per refresh "
          f"{frozen}, max frozen |dW| {max(drift, default=0.0):g}") if losses else f"exit {rc}, no metrics; see {log}"
print(json.dumps({"check": "trainer", "case": f"pretrain x{ranks} bf16 z2", "ok": ok, "exit": rc,
                  "losses": losses, "frozen_heads": frozen, "frozen_max_abs_change": max(drift, default=None),
                  "detail": detail}))
EOF
[ "$RC2" -ne 0 ] && tail -n 30 "$OUT/trainer.log" >&2

# -- summary -----------------------------------------------------------------------------------------------------------
echo
"$PY" tests/scripts/gpu_check.py --report "$OUT/gpu_check.jsonl" "$OUT/trainer.jsonl"
RC=$?
[ "$RC1" -ne 0 ] && RC=1
[ "$RC2" -ne 0 ] && RC=1
exit $RC
