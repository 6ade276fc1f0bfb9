"""tools/env.sh fails loudly when pip fails, records nothing, and installs again next time.

The venv is a stand-in: its `bin/python` runs this test's interpreter, except `-m pip install`,
which fails or succeeds as the test says (no network, no real install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/bin/sh
if [ "$1 $2 $3" = "-m pip install" ]; then
  echo "pip install $*" >> "$(dirname "$0")/../pip.log"
  if [ -e "$(dirname "$0")/../pip-fails" ]; then echo "ERROR: fake pip failure"; exit 1; fi
  exit 0
fi
exec {python} "$@"
"""


def _source(venv: Path, extras: str = "test") -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSEDKV_VENV": str(venv), "FUSEDKV_EXTRAS": extras}
    cmd = ["bash", "-c", f"source '{REPO}/tools/env.sh' && echo ENV-READY"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_env_script_fails_loudly_and_retries(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    (venv / "pip-fails").touch()

    failed = _source(venv)
    assert failed.returncode == 2, failed.stderr
    assert "ERROR: fake pip failure" in failed.stderr
    assert "failed (exit 1" in failed.stderr and "the next run installs again" in failed.stderr
    assert "ENV-READY" not in failed.stdout and not (venv / ".fusedkv-stamp").exists()

    (venv / "pip-fails").unlink()
    (venv / "pip.log").unlink()
    retried = _source(venv)
    assert retried.returncode == 0, retried.stderr
    assert "[env] installing" in retried.stdout and "ENV-READY" in retried.stdout
    assert f"-e {REPO}[test]" in (venv / "pip.log").read_text()
    assert (venv / ".fusedkv-stamp").exists()

    (venv / "pip.log").unlink()
    again = _source(venv)  # installed and stamped: nothing to do
    assert again.returncode == 0 and "[env] installing" not in again.stdout
    assert not (venv / "pip.log").exists()


@pytest.mark.slow
def test_env_script_builds_transformer_engine_against_the_venvs_torch(tmp_path):
    """FUSEDKV_EXTRAS=te: the package without te, then TE with --no-build-isolation for the
    CUDA major version of the venv's torch (a CPU-only torch is refused)."""
    import torch

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    result = _source(venv, "test,te")
    log = (venv / "pip.log").read_text()
    assert f"-e {REPO}[test]" in log
    if torch.version.cuda is None:
        assert result.returncode == 2 and "CPU-only build" in result.stderr
        return
    major = torch.version.cuda.split(".")[0]
    assert f"--no-build-isolation transformer-engine[pytorch,core_cu{major}]==2.20.2" in log
    # the fake pip installed nothing: the import check fails loudly, nothing is stamped
    assert result.returncode == 2 and "import transformer_engine.pytorch' fails" in result.stderr
    assert not (venv / ".fusedkv-stamp").exists()
