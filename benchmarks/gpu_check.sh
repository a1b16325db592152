#!/usr/bin/env bash
# The one prepared GPU check (issue 17): every `cuda`-marked test, then the GPU benchmarks, in
# about 8 minutes, all results in one file. A session lent a GPU runs it in one call and records
# the figures in docs/benchmarks.md.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Setup, in this order:
#   * torch: the python's own when it sees a GPU (a GPU image ships one); else, with
#     TIERFLOW_TORCH_INDEX set (e.g. https://download.pytorch.org/whl/cu128), pip installs
#     ${TIERFLOW_TORCH:-torch} from it; else it stops and says so.
#   * tierflow's other dependencies: from wheels in .whl/ when that folder exists (a machine with
#     no network: carry them, see docs/benchmarks.md), else from PyPI; kvikio the same way, and a
#     kvikio that does not install is reported, not fatal (the kvikio rows then say why).
#   * tierflow itself is imported from this checkout (no install: a path shim), so nothing here
#     touches the checkout.
# --dry-run: on a machine without a GPU, checks the plumbing instead: the cuda tests are collected
# (not run), the benchmark runs on CPU with a tiny model. Results: DIR/gpu_check.txt (default
# $OUT when set, else ./gpu_check_out).
set -uo pipefail

DRY=0
OUT_DIR="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ] && [ "$DRY" = 1 ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
mkdir -p "$OUT_DIR"
RESULTS="$(cd "$OUT_DIR" && pwd)/gpu_check.txt"
: > "$RESULTS"
START=$(date +%s)
log() { echo "$@" | tee -a "$RESULTS"; }
section() { log ""; log "== $* ($(( $(date +%s) - START )) s)"; }

section "setup"
log "repo $REPO; python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if [ "$DRY" = 1 ]; then
        log "no GPU: dry run (the cuda tests are collected, the benchmark runs on CPU)"
    elif [ -n "${TIERFLOW_TORCH_INDEX:-}" ]; then
        log "installing ${TIERFLOW_TORCH:-torch} from $TIERFLOW_TORCH_INDEX"
        "$PY" -m pip install -q "${TIERFLOW_TORCH:-torch}" --index-url "$TIERFLOW_TORCH_INDEX" 2>&1 | tee -a "$RESULTS"
        "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
            log "FAILED: torch from $TIERFLOW_TORCH_INDEX sees no GPU"; exit 1; }
    else
        log "FAILED: this python's torch sees no GPU; set TIERFLOW_TORCH_INDEX to a CUDA wheel index, or use --dry-run"
        exit 1
    fi
fi
SITE=/tmp/tierflow_gpu_site
mkdir -p "$SITE/tierflow"
echo "__path__ = ['$REPO']" > "$SITE/tierflow/__init__.py"  # tierflow.* from this checkout, uninstalled
DEPS="hydra-core omegaconf wandb tqdm matplotlib scipy zfec xxhash safetensors psutil pytest pytest-timeout"
if [ -d "$REPO/.whl" ]; then
    log "dependencies from the carried wheels in .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl 2>&1 | tail -3 | tee -a "$RESULTS"
elif [ "$DRY" = 0 ]; then
    "$PY" -m pip install -q $DEPS 2>&1 | tail -3 | tee -a "$RESULTS"
    "$PY" -m pip install -q "kvikio-cu${KVIKIO_CUDA:-13}" 2>&1 | tail -1 | tee -a "$RESULTS" \
        || log "kvikio did not install (its rows will say why)"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS"
import torch
import tierflow.offload  # noqa: F401 - the checkout imports
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
try:
    import kvikio
    print(f"kvikio {kvikio.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"kvikio: not importable ({type(exc).__name__}: {exc})")
EOF

section "cuda-marked tests"
cd "$REPO" || exit 1
if [ "$DRY" = 1 ]; then
    timeout 120 "$PY" -m pytest -q -m cuda --collect-only -p no:cacheprovider tests/ 2>&1 | tail -20 | tee -a "$RESULTS"
else
    timeout 270 "$PY" -m pytest -q -m cuda -p no:cacheprovider -n 0 --timeout 120 -rA tests/ 2>&1 \
        | tail -40 | tee -a "$RESULTS"
    log "pytest exit status ${PIPESTATUS[0]}"
fi

section "GPU benchmarks (benchmarks/gpu_offload.py)"
if [ "$DRY" = 1 ]; then
    timeout 300 "$PY" benchmarks/gpu_offload.py --dry-run --budgets 0.9,0.8 --json "$OUT_DIR/gpu_offload.json" 2>&1 \
        | tee -a "$RESULTS"
else
    timeout 240 "$PY" benchmarks/gpu_offload.py --json "$OUT_DIR/gpu_offload.json" 2>&1 | tee -a "$RESULTS"
fi
log "benchmark exit status ${PIPESTATUS[0]}"

section "Python cost per transfer (benchmarks/transfer_cost.py)"
if [ "$DRY" = 1 ]; then
    timeout 120 "$PY" benchmarks/transfer_cost.py --tensors 200 --rounds 1 2>&1 | tee -a "$RESULTS"
else
    timeout 45 "$PY" benchmarks/transfer_cost.py --device cuda --tensors 1000 --rounds 3 2>&1 | tee -a "$RESULTS"
fi
log "transfer cost exit status ${PIPESTATUS[0]}"

section "done"
log "results: $RESULTS (figures also in $OUT_DIR/gpu_offload.json)"
