#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the package into it.
# Sourced by tools/test.sh and examples/quickstart.sh. Sets VENV and PY.
#   FUSEDKV_VENV   where the environment lives (default: <repo>/.venv)
#   FUSEDKV_EXTRAS pip extras to install, comma-separated (default: test). "te" installs
#                  Transformer Engine on a GPU machine: its torch extension is compiled against
#                  the torch already in the venv (pip --no-build-isolation); see docs/training.md.
#   FUSEDKV_TE_VERSION  the Transformer Engine version for "te" (default 2.20.2)
# A failing pip stops here with exit 2 and records nothing, so the next run installs again.
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

pip_install() { # pip in the venv, without its "Location" warnings; exit 2 when pip fails
    local log rc=0
    log="$(mktemp)"
    "$VENV/bin/python" -m pip install "$@" >"$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    if [ "$rc" -ne 0 ]; then
        echo "error: 'pip install $*' failed (exit $rc; its output is above). Nothing was recorded: the next run installs again" >&2
        exit 2
    fi
}

# The stamp records what was installed; a change to setup.py or the extras reinstalls.
STAMP_WANT="$(cat "$REPO/setup.py" "$REPO/tools/env.sh" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fusedkv-stamp" 2>/dev/null)" != "$STAMP_WANT" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        PY312="$(find_python312)" || { echo "error: Python 3.12 not found (megatron-core>=0.17 needs it); install python3.12 or put it on PATH" >&2; exit 2; }
        echo "[env] creating $VENV with $PY312"
        "$PY312" -m venv "$VENV"
    fi
    rm -f "$VENV/.fusedkv-stamp"  # until this install has succeeded
    # Transformer Engine is installed last, built against the venv's torch (see below).
    PIP_EXTRAS="$(echo ",$EXTRAS," | sed 's/,te,/,/g; s/^,//; s/,$//')"
    echo "[env] installing fusedkv_megatron[$PIP_EXTRAS] (torch from PyPI; the CUDA build also runs on CPU)"
    pip_install -q --upgrade pip setuptools wheel
    pip_install -q -e "$REPO${PIP_EXTRAS:+[$PIP_EXTRAS]}"
    "$VENV/bin/python" -W ignore -c "import megatron.core, torch" || { echo "error: installation failed: 'import megatron.core, torch' fails in $VENV; the next run installs again" >&2; exit 2; }
    if [ "$PIP_EXTRAS" != "$EXTRAS" ]; then
        # TE's torch extension is an sdist: with build isolation pip would compile it against
        # a freshly downloaded torch (another ABI); it needs nvcc, the CUDA and cuDNN headers
        # and nccl.h, and compiles for a long while (set MAX_JOBS to bound its memory).
        TE_CUDA="$("$VENV/bin/python" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')"
        [ -n "$TE_CUDA" ] || { echo "error: FUSEDKV_EXTRAS has te, but the venv's torch is a CPU-only build; install a CUDA build of torch first" >&2; exit 2; }
        echo "[env] installing transformer-engine ${FUSEDKV_TE_VERSION:-2.20.2} for CUDA $TE_CUDA (compiles its torch extension)"
        pip_install --no-build-isolation "transformer-engine[pytorch,core_cu$TE_CUDA]==${FUSEDKV_TE_VERSION:-2.20.2}"
        "$VENV/bin/python" -c "import transformer_engine.pytorch" || { echo "error: Transformer Engine installed but 'import transformer_engine.pytorch' fails (above); the next run installs again" >&2; exit 2; }
    fi
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
