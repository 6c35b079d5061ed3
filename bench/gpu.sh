#!/usr/bin/env bash
# Every GPU check of the Triton fused attention (issue 12) in one command, for one H100/H200 in about ten
# minutes, with one report at the end:
#   1. bench/attention.py: our kernels against each SDPA backend (flash, memory-efficient, cuDNN, math) at the
#      decoder's shapes (32 heads, head dim 128, 1k-8k tokens, causal) and ViT-L/14-336's (577 tokens, 16
#      heads, head dim 64), forward and forward+backward, each path validated before it is timed;
#   2. bench/train_speed.py: train-step MFU, stage 1 at the full 7B shapes and stage 2 with the decoder cut to
#      8 layers, --attn sdpa beside --attn triton;
#   3. train.py: 20 steps of the tiny preset from scratch in bf16 (--attn triton) against the same 20 steps in
#      fp32 (--attn sdpa, which is what fp32 on a GPU takes), on a small synthetic world, step by step losses;
#   4. the kernel and attention tests, which on a GPU run the kernels compiled, in fp16 and bf16.
# Each part runs under its own `timeout` (on a GPU they add up to 580 s, so the whole fits one 600 s call); a
# part that fails or runs out of time is reported as such and the others still run. Parts 1-2 come first: they
# compile the kernels for the two head dims that parts 3-4 then find in Triton's cache. In a dry run the limits
# are 300 s a part, only a guard against a hang (on an idle 2-core machine the whole takes about a minute of CPU).
#
#   bench/gpu.sh             # on the GPU machine
#   bench/gpu.sh --dry_run   # on a CPU: every part with tiny shapes, under the Triton interpreter (fp32 / fp16,
#                            # since the interpreter computes bf16 wrongly); checks this script, measures nothing
# Logs stay in the directory the report names. Exit status: the number of parts that did not pass.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
case "${1:-}" in
  --dry_run) DRY=1 ;;
  "") ;;
  *) echo "bench/gpu.sh: unknown argument '$1'; usage: bench/gpu.sh [--dry_run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 0 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "bench/gpu.sh: no CUDA GPU here; on a CPU run bench/gpu.sh --dry_run to check the script" >&2
  exit 2
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh.XXXXXX")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi

PARTS=()
FAILED=0
# part NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output in $WORK/NAME.log.
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc
  echo "[$(date -u +%T)] $name (limit ${limit}s): $*" >&2
  (cd "$WORK" && timeout --kill-after=10 "$limit" "$@") >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT after ${limit}s"; elif [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; fi
  [ "$status" = ok ] || FAILED=$((FAILED + 1))
  PARTS+=("$name|$status|$took")
}

# ---- 1. attention kernels against SDPA ----
if [ "$DRY" = 1 ]; then
  part attention 300 python3 "$ROOT/bench/attention.py" --dry_run
else
  part attention 120 python3 "$ROOT/bench/attention.py" --dtype bf16
fi

# ---- 2. train-step MFU, sdpa beside triton ----
if [ "$DRY" = 1 ]; then
  S1=(--preset tiny --stage 1 --batch 2 --text_len 8 --steps 1 --warmup 1 --dtype float32)
  S2=(--preset tiny --stage 2 --layers 2 --batch 2 --text_len 8 --steps 1 --warmup 1 --dtype float32)
  LIMIT=300
else
  S1=(--preset llava-med-v1.5-mistral-7b --stage 1 --batch 8 --grad_ckpt --dtype bfloat16)
  S2=(--preset llava-med-v1.5-mistral-7b --stage 2 --layers 8 --batch 8 --dtype bfloat16)
  LIMIT=40
fi
for attn in sdpa triton; do
  part "mfu-stage1-$attn" "$LIMIT" python3 "$ROOT/bench/train_speed.py" "${S1[@]}" --attn "$attn"
  part "mfu-stage2-$attn" "$LIMIT" python3 "$ROOT/bench/train_speed.py" "${S2[@]}" --attn "$attn"
done

# ---- 3. bf16 losses against fp32, tiny preset from scratch, train.py's own loop ----
if [ "$DRY" = 1 ]; then
  STEPS=3 BATCH=4 VAL=8 BF16_ATTN=sdpa LIMIT=300 WORLD_LIMIT=300  # bf16 through the interpreter would be wrong
else
  STEPS=20 BATCH=8 VAL=32 BF16_ATTN=triton LIMIT=50 WORLD_LIMIT=30
fi
WORLD_ARGS=(--n_pmc 0 --n_instruct 0 --n_vqa_train 0 --n_vqa_test 2 --n_general $((STEPS * BATCH + VAL + 8)))
TRAIN_ARGS=(--stage 0 --preset tiny --data world/general.json --image_folder world/images
  --eval_data world/vqa_test.json --eval_questions 2 --max_iters "$STEPS" --global_batch "$BATCH"
  --micro_batch "$BATCH" --max_len 256 --lr 5e-4 --val_size "$VAL" --log_interval 1 --ckpt_interval 100000)
part world "$WORLD_LIMIT" python3 -m minillavamed.synthetic_world --out world "${WORLD_ARGS[@]}"
part losses-fp32 "$LIMIT" python3 "$ROOT/train.py" "${TRAIN_ARGS[@]}" --out_dir run-fp32 --dtype float32 --attn sdpa
# The same tokenizer for both runs: stage 0 trains one into out_dir unless it is already there.
mkdir -p "$WORK/run-bf16" && cp -r "$WORK/run-fp32/tokenizer" "$WORK/run-bf16/" 2>/dev/null
part losses-bf16 "$LIMIT" python3 "$ROOT/train.py" "${TRAIN_ARGS[@]}" --out_dir run-bf16 --dtype bfloat16 \
  --attn "$BF16_ATTN"
part losses-compare 10 python3 - "$WORK/run-fp32/metrics.jsonl" "$WORK/run-bf16/metrics.jsonl" <<'EOF'
import json, sys
# bf16 rounds every product's inputs to 8 mantissa bits; over a short run from the same start its losses stay
# within a few percent of fp32's. A kernel or dtype bug shows up as a loss far off or not finite.
TOLERANCE = 0.05
fp32, bf16 = ({r["iter"]: r["loss"] for r in map(json.loads, open(f))} for f in sys.argv[1:])
print(f"{'iter':>4} {'fp32 loss':>10} {'bf16 loss':>10} {'rel diff':>9}")
worst = 0.0
for it in sorted(fp32):
    diff = abs(bf16.get(it, float("nan")) - fp32[it]) / fp32[it]
    worst = max(worst, diff) if diff == diff else float("inf")  # a missing or NaN bf16 loss fails
    print(f"{it:>4} {fp32[it]:>10.4f} {bf16.get(it, float('nan')):>10.4f} {diff:>9.2%}")
print(f"largest relative difference {worst:.2%} over {len(fp32)} steps (tolerance {TOLERANCE:.0%})")
sys.exit(0 if len(bf16) == len(fp32) > 0 and worst <= TOLERANCE else 1)
EOF

# ---- 4. kernel and attention tests (compiled fp16 / bf16 on a GPU) ----
if [ "$DRY" = 1 ]; then
  part tests 300 python3 -m pytest -q -p no:cacheprovider "$ROOT/tests/test_kernels.py" "$ROOT/tests/test_attention.py" \
    -k "float16_in_interpreter or training_step"
else
  part tests 160 python3 -m pytest -q -p no:cacheprovider -m "not slow" "$ROOT/tests/test_kernels.py" \
    "$ROOT/tests/test_attention.py"
fi

# ---- the report ----
echo
echo "== bench/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry_run (CPU, Triton interpreter, tiny shapes: not measurements)') =="
echo "date: $(date -u '+%F %T UTC'); commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
echo "logs: $WORK"
for entry in "${PARTS[@]}"; do
  IFS='|' read -r name status took <<<"$entry"
  echo
  echo "-- $name: $status, ${took}s"
  case "$name" in
    attention | losses-compare) cat "$WORK/$name.log" ;;
    mfu-*) grep -E "^(tiny|llava|step|peak)" "$WORK/$name.log" ;;
    losses-fp32 | losses-bf16) grep -E "^(stage|iter $STEPS/|eval)" "$WORK/$name.log" | cut -c1-200 ;;
    *) tail -n 3 "$WORK/$name.log" ;;
  esac
  [ "$status" = ok ] || { echo "   last lines of the log:"; tail -n 5 "$WORK/$name.log" | sed 's/^/   /'; }
done
echo
echo "parts not passed: $FAILED of ${#PARTS[@]}"
exit "$FAILED"
