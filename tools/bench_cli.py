"""Wall time of `fusedkv-pretrain --help` and of an argument error, each in a fresh
interpreter (what a user waits for on a login node), median over repeats.

    .venv/bin/python tools/bench_cli.py [--repeats 5]

Both stop before torch or Megatron is imported (tests/unit/test_arguments.py checks that);
for scale it also times `python -c "import torch"` on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "fusedkv-pretrain --help": ["-m", "fusedkv_megatron.pretrain", "--help"],
    "fusedkv-pretrain --mock-data (no model shape: exit 2)": [
        "-m",
        "fusedkv_megatron.pretrain",
        "--mock-data",
    ],
    'python -c "import torch" (for scale)': ["-c", "import torch"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    for name, args in CASES.items():
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {statistics.median(times):.3f} s over {a.repeats} runs")


if __name__ == "__main__":
    main()
