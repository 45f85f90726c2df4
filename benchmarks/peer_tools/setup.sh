#!/usr/bin/env bash
# Creates the peer-tool environments for benchmarks/peer_table.py (idempotent; a stamp per venv):
#   .venv-peers            llmcompressor (GPTQ, AWQ) + hqq      requirements-llmcompressor.txt
#   .venv-peers-autoround  auto-round                          requirements-autoround.txt
# Two venvs because llmcompressor 0.14 pins auto-round<=0.15.1. PEERS_VENV_DIR=<dir> puts them elsewhere.
# torch comes from /opt/wheels/torch-2.13.0+cpu-*.whl when that file exists (as for the main .venv), else PyPI.
#   bash benchmarks/peer_tools/setup.sh [llmcompressor|autoround ...]     # default: both
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
base="${PEERS_VENV_DIR:-$root}"

install_venv() {  # venv dir, requirements file, import check
  local venv="$1" req="$2" check="$3" stamp="$1/.peers-installed"
  if [[ -f "$stamp" ]] && cmp -s "$stamp" "$req"; then
    echo "up to date: $venv"; return 0
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --upgrade pip
  shopt -s nullglob
  local wheels=(/opt/wheels/torch-2.13.0+cpu-*.whl)
  if (( ${#wheels[@]} )); then
    "$venv/bin/pip" install "${wheels[0]}"
  else
    "$venv/bin/pip" install torch
  fi
  "$venv/bin/pip" install -r "$req"
  "$venv/bin/python" -c "$check"
  cp "$req" "$stamp"
  echo "ready: $venv"
}

targets=("$@")
(( ${#targets[@]} )) || targets=(llmcompressor autoround)
for t in "${targets[@]}"; do
  case "$t" in
    llmcompressor) install_venv "$base/.venv-peers" "$here/requirements-llmcompressor.txt" \
      "import llmcompressor, hqq, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" ;;
    autoround) install_venv "$base/.venv-peers-autoround" "$here/requirements-autoround.txt" \
      "import auto_round, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" ;;
    *) echo "unknown target $t (llmcompressor|autoround)" >&2; exit 2 ;;
  esac
done
