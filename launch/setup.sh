#!/usr/bin/env bash
# Set up tierflow in a virtual environment inside the checkout, then run one thing in it.
#
#   launch/setup.sh train [overrides...]   short training run of the built-in model
#   launch/setup.sh test  [pytest args...] the full test suite
#   launch/setup.sh shell                  only set up; prints how to activate
#
# Idempotent: the venv is created once and the project reinstalled only when pyproject.toml changes.
# torch is installed first, on its own, so no dependency pulls a multi-GB CUDA build onto a CPU-only
# machine. Override what is installed with:
#   TIERFLOW_TORCH        the torch requirement          (default: torch==2.13.0)
#   TIERFLOW_TORCH_INDEX  an index for it, e.g. https://download.pytorch.org/whl/cpu for a CPU build
#                         or https://download.pytorch.org/whl/cu128 for CUDA (default: pip's own)
#   TIERFLOW_EXTRAS       extras of the project to install (default: dev)
#   TIERFLOW_DEEPSPEED    the deepspeed requirement, installed for the dev and deepspeed extras
#   PYTHON                the interpreter that creates the venv (default: python3)
#   TIERFLOW_VENV         where the venv lives (default: .venv in the checkout)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${TIERFLOW_VENV:-.venv}
py="$venv/bin/python"
say() { printf 'setup: %s\n' "$*" >&2; }

if [ ! -x "$py" ]; then
  say "creating $venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv "$venv"
fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  spec=${TIERFLOW_TORCH:-torch==2.13.0}
  index=()
  [ -n "${TIERFLOW_TORCH_INDEX:-}" ] && index=(--index-url "$TIERFLOW_TORCH_INDEX")
  say "installing $spec ${TIERFLOW_TORCH_INDEX:+from $TIERFLOW_TORCH_INDEX}"
  "$py" -m pip install --quiet "${index[@]}" "$spec"
fi

extras=${TIERFLOW_EXTRAS:-dev}
# DeepSpeed (its plugin and the peer in benchmarks) is published as a source package whose build
# imports torch: built in an isolated environment it would pull a second, CUDA, torch. Build it
# against the torch just installed instead. The dev extra's tests need it.
case ",$extras," in
  *,dev,*|*,deepspeed,*)
    if ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
      say "installing ${TIERFLOW_DEEPSPEED:-deepspeed>=0.15} (built against this torch)"
      "$py" -m pip install --quiet setuptools wheel
      DS_BUILD_OPS=0 "$py" -m pip install --quiet --no-build-isolation "${TIERFLOW_DEEPSPEED:-deepspeed>=0.15}"
    fi ;;
esac
stamp="$venv/.tierflow-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing tierflow[$extras] (editable)"
  "$py" -m pip install --quiet -e ".[$extras]"
  echo "$want" >"$stamp"
fi

cmd=${1:-shell}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) exec "$venv/bin/tierflow" train "$@" ;;
  # TIERFLOW_TEST_WORKERS=2: two pytest workers taking whole files. Once DeepSpeed's ops are built that
  # halves the suite on 2 cores; on a fresh machine the op builds fill both cores anyway and it is
  # slower (measured in CI: 1597 s against 1519 s), so one process is the default.
  test)  exec "$py" -m pytest -n "${TIERFLOW_TEST_WORKERS:-0}" --dist loadfile "$@" ;;
  shell) say "ready: source $venv/bin/activate" ;;
  *) say "unknown command '$cmd'; use train, test or shell"; exit 2 ;;
esac
