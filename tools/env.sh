#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the package into it.
# Sourced by tools/test.sh and examples/quickstart.sh. Sets VENV and PY.
#   FUSEDKV_VENV   where the environment lives (default: <repo>/.venv)
#   FUSEDKV_EXTRAS pip extras to install (default: test)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDKV_VENV:-$REPO/.venv}"
EXTRAS="${FUSEDKV_EXTRAS:-test}"

find_python312() {
    local c
    for c in python3.12 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
            echo "$c"; return 0
        fi
    done
    return 1
}

# The stamp records what was installed; a change to setup.py or the extras reinstalls.
STAMP_WANT="$(cat "$REPO/setup.py" "$REPO/tools/env.sh" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fusedkv-stamp" 2>/dev/null)" != "$STAMP_WANT" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        PY312="$(find_python312)" || { echo "error: Python 3.12 not found (megatron-core>=0.17 needs it); install python3.12 or put it on PATH" >&2; exit 2; }
        echo "[env] creating $VENV with $PY312"
        "$PY312" -m venv "$VENV"
    fi
    echo "[env] installing fusedkv_megatron[$EXTRAS] (torch from PyPI; the CUDA build also runs on CPU)"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e "$REPO[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -W ignore -c "import megatron.core, torch" || { echo "error: installation failed" >&2; exit 2; }
    echo "$STAMP_WANT" > "$VENV/.fusedkv-stamp"
fi

# An uninstalled Transformer Engine can leave an empty package folder behind; Megatron then
# believes TE is present and every model build fails. Refuse to run on such a folder.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d "$SITE/transformer_engine" ] && ! "$VENV/bin/python" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
    echo "error: $SITE/transformer_engine exists but 'import transformer_engine.pytorch' fails (a stray folder left by an uninstall?). Remove it: rm -rf '$SITE/transformer_engine'" >&2
    exit 2
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
