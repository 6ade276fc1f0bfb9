"""Talks to a running `vllm serve` with the `openai` client (serving environment): one
completion and one streamed completion, greedy; writes what came back to JSON.

    python openai_client.py BASE_URL MODEL PROMPT MAX_TOKENS OUT.json
"""

from __future__ import annotations

import json
import os
import sys


def main(base_url: str, model: str, prompt: str, max_tokens: str, out: str) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
    n = int(max_tokens)
    greedy = dict(max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    done = client.completions.create(model=model, prompt=prompt, **greedy)
    chunks = [
        c.choices[0].text
        for c in client.completions.create(model=model, prompt=prompt, stream=True, **greedy)
        if c.choices
    ]
    result = {
        "text": done.choices[0].text,
        "completion_tokens": done.usage.completion_tokens,
        "stream_chunks": chunks,
        "models": [m.id for m in client.models.list().data],
    }
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
