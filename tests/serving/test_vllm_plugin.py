"""The vLLM plugin (serving/fusedkv_vllm) against the exported Hugging Face model, every variant.

One vLLM process (the serving venv, tools/serve_env.sh) serves every tiny export in turn; the
reference is each export loaded with its own remote code in this (the project's) environment.
- Exactness: greedy tokens equal and per-token log-probs within 5e-5 (float32), with chunked
  prefill (prompts of 80 tokens, a 32-token batch budget) and prefix caching (a second pass
  served from the cache: at least 64 prompt tokens cached per request).
- The same with the top half run on the logit rows only (the prefill saving, opt-in), for the
  FusedKV family.
- Negative control: the fusedkv export served with a wrong middle source layer must fail that
  comparison.
- Capacity: the KV-cache tokens the engine sized at VLLM_CPU_KVCACHE_SPACE=1 are >= 1.9x (here
  exactly 2x) those of a vanilla export of the same shape.
- Refusals: dense_probe and --kv-sharing-fast-prefill stop at start-up with the reason.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.serving import exports

pytestmark = [pytest.mark.serving, pytest.mark.slow]

LOGPROB_TOL = 5e-5
PROMPT_LEN, BUDGET, BLOCK, STEPS = 80, 32, 32, 6
ENGINE = dict(max_model_len=256, block_size=BLOCK, max_num_batched_tokens=BUDGET,
              enable_chunked_prefill=True, enable_prefix_caching=True, max_num_seqs=4,
              enforce_eager=True)  # fmt: skip
# name -> (variant, export overrides). fusedkv_lite_learnable runs with 2 KV heads (fusion
# weights shared by query-head groups) and interleaved RoPE; its same-shape vanilla is gqa.
EXPORTS = {
    "vanilla": ("vanilla", {}),
    "gqa": ("gqa", {}),
    "cla": ("cla", {"num_key_value_heads": 4}),
    "yoco": ("yoco", {"num_key_value_heads": 4}),
    "fusedkv": ("fusedkv", {"num_key_value_heads": 4}),
    "fusedkv_lite": ("fusedkv_lite", {"num_key_value_heads": 4}),
    "fusedkv_lite_learnable": ("fusedkv_lite_learnable", {"rotary_interleaved": True}),
}
SAME_SHAPE_VANILLA = {name: ("gqa" if ov.get("num_key_value_heads", 2) == 2 else "vanilla")
                      for name, (_, ov) in EXPORTS.items()}  # fmt: skip
SHARING = ["cla", "yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable"]
# Served again with the top half on the logit rows only (FUSEDKV_VLLM_TOP_PREFILL=1).
TOP_PREFILL = ["fusedkv", "fusedkv_lite_learnable"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports, HF references and one vLLM worker run over all of them."""
    from tests.serving.harness import run_worker, serve_python

    python = serve_python()
    root = tmp_path_factory.mktemp("serving")
    prompts = exports.prompts(3, PROMPT_LEN)
    runs, refs = [], {}
    for name, (variant, overrides) in EXPORTS.items():
        path = exports.build_export(root / name, variant, **overrides)
        model = exports.load_reference(path)
        refs[name] = [exports.greedy_reference(model, p, STEPS) for p in prompts]
        runs.append(dict(name=name, model=str(path), engine=ENGINE, prompts=prompts,
                         max_tokens=STEPS, passes=2))  # fmt: skip
    for name in TOP_PREFILL:
        runs.append(dict(runs[list(EXPORTS).index(name)], name=f"{name}+top_prefill",
                         env={"FUSEDKV_VLLM_TOP_PREFILL": "1"}))  # fmt: skip
    # Negative control: the fusedkv export told its middle source is layer 3 (it is 4).
    wrong = root / "fusedkv_wrong_source"
    shutil.copytree(root / "fusedkv", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["kv_source_layers"] = [1, 3]
    (wrong / "config.json").write_text(json.dumps(cfg))
    runs.append(dict(name="wrong_source", model=str(wrong), engine=ENGINE, prompts=prompts,
                     max_tokens=STEPS, passes=1))  # fmt: skip
    probe = exports.build_export(root / "dense_probe", "dense_probe")
    runs.append(dict(name="dense_probe", model=str(probe), engine=ENGINE, prompts=prompts[:1],
                     max_tokens=1))  # fmt: skip
    runs.append(dict(name="fast_prefill", model=str(root / "fusedkv"),
                     engine=ENGINE | {"kv_sharing_fast_prefill": True}, prompts=prompts[:1],
                     max_tokens=1))  # fmt: skip
    results = run_worker(python, {"runs": runs}, root)
    return results, refs


def mismatch(got: list[dict], want: list[dict]) -> str | None:
    """Why a pass differs from the reference (None when equal within LOGPROB_TOL)."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g["tokens"] != w["tokens"]:
            return f"prompt {i}: tokens {g['tokens']} != reference {w['tokens']}"
        gap = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True))
        if gap > LOGPROB_TOL:
            return f"prompt {i}: log-probs differ by {gap:.2e} > {LOGPROB_TOL}"
    return None


@pytest.mark.parametrize("name", list(EXPORTS) + [f"{n}+top_prefill" for n in TOP_PREFILL])
def test_greedy_tokens_and_logprobs_equal_the_hf_export(served, name):
    results, refs = served
    result, ref = results[name], refs[name.split("+")[0]]
    assert "error" not in result, result.get("trace", result.get("error"))
    first, second = result["passes"]
    assert mismatch(first, ref) is None, mismatch(first, ref)
    assert mismatch(second, ref) is None, mismatch(second, ref)
    # The second pass was served from the prefix cache (two full 32-token blocks at least).
    assert all(r["cached_prompt_tokens"] >= 2 * BLOCK for r in second), second


def test_a_wrong_source_layer_fails_the_comparison(served):
    results, refs = served
    result = results["wrong_source"]
    assert "error" not in result, result.get("error")
    assert mismatch(result["passes"][0], refs["fusedkv"]) is not None


@pytest.mark.parametrize("name", SHARING)
def test_kv_capacity_is_twice_vanilla(served, name):
    results, _ = served
    mine = results[name]["capacity_tokens"]
    vanilla = results[SAME_SHAPE_VANILLA[name]]["capacity_tokens"]
    assert mine >= 1.9 * vanilla, (name, mine, vanilla)
    assert mine == 2 * vanilla  # half the cache per token, exactly


def test_refusals_name_the_reason(served):
    results, _ = served
    assert "dense_probe" in results["dense_probe"].get("error", ""), results["dense_probe"]
    assert "kv-sharing-fast-prefill" in results["fast_prefill"].get("error", ""), results[
        "fast_prefill"
    ]
