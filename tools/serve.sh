#!/usr/bin/env bash
# Serve an exported model with vLLM's OpenAI-compatible server:
#   bash tools/serve.sh EXPORT_DIR [vllm serve flags, e.g. --port 8000 --dtype float32]
# Creates or reuses the serving environment (tools/serve_env.sh: Python 3.11, vLLM, the
# fusedkv_vllm plugin) and runs `vllm serve EXPORT_DIR`. FusedKV, FusedKV-Lite, YOCO and CLA
# exports (fusedkv-convert-hf) are served by the plugin; vanilla/gqa exports are stock Qwen3.
# On CPU the KV-cache budget is VLLM_CPU_KVCACHE_SPACE (GiB), as in vLLM; this script sets 4
# when it is unset (vLLM's CPU default otherwise asks for 92% of the machine's memory).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ ! -f "$1/config.json" ]; then
    echo "usage: bash tools/serve.sh EXPORT_DIR [vllm serve flags]" >&2
    echo "error: EXPORT_DIR must be a Hugging Face export with a config.json (got '${1:-}'); make one with fusedkv-convert-hf --load CKPT_DIR --out EXPORT_DIR" >&2
    exit 2
fi
EXPORT="$1"; shift
source "$REPO/tools/serve_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"
# fusedkv_vllm.cli is `vllm` (the CPU wheel's own `vllm` command fails to find its version).
exec "$SERVE_PY" -m fusedkv_vllm.cli serve "$EXPORT" "$@"
