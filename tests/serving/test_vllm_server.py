"""`bash tools/serve.sh EXPORT --port P` serves a FusedKV export over HTTP, and the `openai`
client gets the exported HF model's greedy text back (plain and streamed). Bounded: one server,
two requests, a start-up deadline; the server is stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import free_port
from tests.serving import exports

pytestmark = [pytest.mark.serving, pytest.mark.slow]

PROMPT, MAX_TOKENS, STARTUP_S = "the fused keys and values of the middle layer", 8, 600


def wait_healthy(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n{log()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve not healthy after {STARTUP_S} s:\n{log()[-6000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (vLLM's engine runs in a child), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_openai_client_completions_and_streaming(tmp_path):
    from transformers import AutoTokenizer

    from tests.integration.hf_tiny import train_sentencepiece
    from tests.serving.harness import REPO, serve_python, serving_env

    python = serve_python()
    sp_model = train_sentencepiece(str(tmp_path / "tok"))
    export = exports.build_export(tmp_path / "fusedkv", "fusedkv", tokenizer_model=sp_model,
                                  num_key_value_heads=4)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    ids = tok(PROMPT)["input_ids"]
    ref = exports.greedy_reference(exports.load_reference(export), ids, MAX_TOKENS)
    want = tok.decode(ref["tokens"], skip_special_tokens=True)

    port = free_port()
    log_path = tmp_path / "serve.log"
    env = serving_env() | {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", "tools/serve.sh", str(export), "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
             "--served-model-name", "fusedkv-tiny"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path.read_text)
        out = tmp_path / "client.json"
        subprocess.run([str(python), str(REPO / "tests/serving/openai_client.py"),
                        f"http://127.0.0.1:{port}/v1", "fusedkv-tiny", PROMPT, str(MAX_TOKENS),
                        str(out)], env=serving_env(), check=True, timeout=300)  # fmt: skip
        got = json.loads(out.read_text())
    finally:
        stop(proc)
    assert got["models"] == ["fusedkv-tiny"]
    assert got["completion_tokens"] == MAX_TOKENS
    assert got["text"] == want, (got["text"], want, ref)
    assert len(got["stream_chunks"]) > 1 and "".join(got["stream_chunks"]) == want
