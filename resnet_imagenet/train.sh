#!/usr/bin/env bash
# ./train.sh GPUS NET OTHER [flags...]      e.g.  ./train.sh 0,1,2,3 resnet_50 resnet_50_
#
#   GPUS   GPU ids (0,1,2,3: one process per GPU), all, cpu, or cpu:N (N gloo processes on the CPU)
#   NET    a folder under prototxt_like/ (or a path to a folder); the solver is NET/${OTHER}solver.prototxt
#   OTHER  the solver's name prefix (resnet_50_ -> resnet_50_solver.prototxt)
#   flags  passed to `resnet-imagenet train`: --snapshot X.solverstate (resume) or --weights A.caffemodel[,B]
#          (fine-tune), --no-amp, --no-channels-last, --sync-bn, --workers N ...
#
# Run it from the project root: paths in the solver and the net (net:, snapshot_prefix, LMDB sources)
# resolve from the current directory, as Caffe's do. The log is tee'd to logs/${NET}_${OTHER}_<date>.log, and
# logs/${NET}_${OTHER}.log links to the newest (what parse_log / plot_log read). Python: $RESNET_IMAGENET_PYTHON,
# else the .venv beside this script, else python3 on PATH (an activated venv).
# Multi-node: the same command on every node with torchrun's rendezvous flags in TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --master_addr node0 --master_port 29500" ./train.sh 0,1,2,3 resnet_50 resnet_50_
#   (node_rank 1 on the second node; snapshots are written by global rank 0, on node 0)
set -uo pipefail

die() { echo "train.sh: error: $*" >&2; exit 1; }

if [ $# -lt 3 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
GPUS=$1 NET=$2 OTHER=$3
shift 3

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -n "${RESNET_IMAGENET_PYTHON:-}" ]; then PY=$RESNET_IMAGENET_PYTHON
elif [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"
else PY=python3; fi

if [ -d "prototxt_like/$NET" ]; then NETDIR="prototxt_like/$NET"
elif [ -d "$NET" ]; then NETDIR="$NET"
else die "no net folder prototxt_like/$NET (nor $NET)"; fi
SOLVER="$NETDIR/${OTHER}solver.prototxt"
[ -f "$SOLVER" ] || die "$SOLVER: no such solver"

case "$GPUS" in
    cpu) NPROC=1 ;;
    cpu:*)
        NPROC=${GPUS#cpu:}
        [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "GPUS $GPUS: expected cpu:N with N >= 1"
        # torchrun would give each process 1 thread; share the cores instead
        CORES=$(nproc 2>/dev/null || echo 1)
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
        ;;
    all)
        NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || die "cannot run $PY"
        [ "$NPROC" -ge 1 ] || die "GPUS all: no GPU is visible"
        ;;
    *)
        [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS $GPUS: expected GPU ids like 0,1,2,3, all, cpu or cpu:N"
        NPROC=$(tr ',' '\n' <<<"$GPUS" | wc -l)
        ;;
esac

# Every check (GPU ids, solver, nets, LMDBs, weights, snapshot) before anything starts: one line on error.
WORLD=$NPROC
if [ -n "${TORCHRUN_ARGS:-}" ] && [[ "$TORCHRUN_ARGS" =~ --nnodes[=\ ]+([0-9]+) ]]; then
    WORLD=$(( NPROC * BASH_REMATCH[1] ))
fi
WORLD_SIZE=$WORLD LOCAL_WORLD_SIZE=$NPROC "$PY" -m resnet_imagenet train --check --solver "$SOLVER" --gpu "$GPUS" "$@" \
    2> >(grep -v '\] Check passed' >&2) || exit 1

mkdir -p logs
LOG="logs/$(basename "$NET")_${OTHER}_$(date +%Y-%m-%d_%H-%M-%S).log"
echo "Logging output to $LOG"
# a stable name for the newest log: replaced only when it is our link (never a file of the user's)
LINK="logs/$(basename "$NET")_${OTHER}.log"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
    ln -sfn "$(basename "$LOG")" "$LINK"
else
    echo "train.sh: $LINK is not a link of ours; left as it is" >&2
fi

if [ -n "${TORCHRUN_ARGS:-}" ]; then
    # shellcheck disable=SC2206
    LAUNCH=($TORCHRUN_ARGS)
else
    LAUNCH=(--standalone)
fi
# Signals. torchrun starts the trainers in their own sessions and forwards the signals it handles, then
# kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT: a stopping trainer finishes its iteration and writes
# its snapshot within that (60 s; raise it for nets whose snapshot takes longer). Ctrl-C (SIGINT) and
# SIGTERM (a scheduler's preemption, `kill <torchrun pid>`) reach torchrun, which forwards them: the
# trainers snapshot and stop (--sigterm-effect). SIGHUP is left to the trainers (`kill -HUP <pid of any
# trainer>`: snapshot and go on); torchrun, this script and tee ignore it, and tee ignores SIGINT too, so
# the last lines reach the log. If torchrun itself is killed (-9), the trainers snapshot and stop.
# Peers: a frozen process is named and the run stopped after RESNET_IMAGENET_PEER_TIMEOUT seconds
# without its heartbeat (120); collectives time out after RESNET_IMAGENET_PG_TIMEOUT (1800: rank 0's
# TEST pass runs while the others wait). torchrun kills what is left 30 s after a trainer fails.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}"
if "$PY" -m torch.distributed.run --help 2>/dev/null | grep -q -- --signals-to-handle; then
    LAUNCH+=(--signals-to-handle SIGTERM,SIGINT,SIGQUIT)
fi
trap '' HUP
"$PY" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node "$NPROC" \
    -m resnet_imagenet train --solver "$SOLVER" --gpu "$GPUS" "$@" 2>&1 | (trap '' INT HUP; exec tee -a "$LOG")
rc=${PIPESTATUS[0]}
# A Ctrl-C stop is a clean end (the trainers snapshotted); torchrun itself still reports the signal.
if [ "$rc" -ne 0 ] && tail -n 50 "$LOG" | grep -q "Optimization stopped early."; then
    rc=0
fi
exit "$rc"
