#!/usr/bin/env bash
# Launch tierflow training with torchrun, on one node or several.
#
# One node, N processes:
#   launch/torchrun.sh --nproc 2 trainer.steps=100
# Several nodes (run the same line on every node; rendezvous through HOST:PORT on one of them):
#   launch/torchrun.sh --nnodes 2 --nproc 8 --rdzv node0.example:29500 model=medium
# Check config and model construction on every rank without training:
#   launch/torchrun.sh --nproc 2 --dry-run model=gpt1b
# Restart a failed worker group up to 3 times; with checkpoint=memory it resumes from memory:
#   launch/torchrun.sh --nproc 2 --max-restarts 3 checkpoint=memory
# An error a restart cannot fix (a wrong setting, a full tier) is not restarted: it is printed once
# and the launcher exits 2 (launch/_torchrun.py; Note [errors a restart cannot fix] in trainer/cli.py).
#
# Flags fall back to the environment: NPROC_PER_NODE, NNODES, RDZV_ENDPOINT (or
# MASTER_ADDR:MASTER_PORT), RDZV_ID, MAX_RESTARTS. Everything else is passed to the trainer as Hydra
# overrides. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is exported so a restarted group does not hang
# in init_process_group (pytorch/pytorch#135712).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3

nproc=${NPROC_PER_NODE:-1}
nnodes=${NNODES:-1}
rdzv=${RDZV_ENDPOINT:-}
[ -z "$rdzv" ] && [ -n "${MASTER_ADDR:-}" ] && rdzv="$MASTER_ADDR:${MASTER_PORT:-29500}"
rdzv_id=${RDZV_ID:-tierflow}
max_restarts=${MAX_RESTARTS:-0}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --rdzv) rdzv=$2; shift 2 ;;
    --rdzv-id) rdzv_id=$2; shift 2 ;;
    --max-restarts|--max_restarts) max_restarts=$2; shift 2 ;;
    --max-restarts=*|--max_restarts=*) max_restarts=${1#*=}; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

if [ "$nnodes" = 1 ]; then
  topo=(--standalone --nnodes 1 --nproc_per_node "$nproc")
else
  if [ -z "$rdzv" ]; then
    echo "torchrun.sh: --nnodes $nnodes needs a rendezvous endpoint: --rdzv HOST:PORT or RDZV_ENDPOINT" >&2
    exit 2
  fi
  topo=(--nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d --rdzv_endpoint "$rdzv" --rdzv_id "$rdzv_id")
fi
case "$max_restarts" in
  ''|*[!0-9]*) echo "torchrun.sh: --max-restarts takes a whole number, got '$max_restarts'" >&2; exit 2 ;;
esac
# pytorch/pytorch#135712: with the rendezvous store shared, a restarted group can read its peers'
# addresses from the attempt before and hang. The trainer warns when this is missing.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cd "$root"
exec "$py" "$root/launch/_torchrun.py" "${topo[@]}" --max-restarts "$max_restarts" -m tierflow.trainer.train "${args[@]}"
