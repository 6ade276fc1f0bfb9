"""tools/env.sh fails loudly when pip fails, records nothing, and installs again next time.

The venv is a stand-in: its `bin/python` answers env.sh's pip installs (failing or succeeding
as the test says), its import checks and torch's CUDA version itself, and runs anything else
with this test's interpreter: no network, no real install, no torch import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/bin/sh
here="$(dirname "$0")/.."
case "$*" in
  "-m pip install"*)
    echo "pip $*" >> "$here/pip.log"
    if [ -e "$here/pip-fails" ]; then echo "ERROR: fake pip failure"; exit 1; fi
    exit 0 ;;
  *"import megatron.core, torch"*) exit 0 ;;
  *"torch.version.cuda"*) echo 13; exit 0 ;;
  *"import transformer_engine.pytorch"*) echo "ImportError: fake TE"; exit 1 ;;
esac
exec {python} "$@"
"""


def _source(venv: Path, extras: str = "test") -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSEDKV_VENV": str(venv), "FUSEDKV_EXTRAS": extras}
    cmd = ["bash", "-c", f"source '{REPO}/tools/env.sh' && echo ENV-READY"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


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


def test_env_script_builds_transformer_engine_against_the_venvs_torch(tmp_path):
    """FUSEDKV_EXTRAS=te: the package without te, then TE with --no-build-isolation for the
    CUDA major version of the venv's torch; a TE that does not import fails loudly."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    result = _source(venv, "test,te")
    log = (venv / "pip.log").read_text()
    assert f"-e {REPO}[test]" in log
    assert "--no-build-isolation transformer-engine[pytorch,core_cu13]==2.20.2" in log
    assert result.returncode == 2 and "import transformer_engine.pytorch' fails" in result.stderr
    assert not (venv / ".fusedkv-stamp").exists()
