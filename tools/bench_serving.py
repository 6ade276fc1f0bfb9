"""Serving throughput and time to first token of every variant vs vanilla, at one fixed KV-cache
budget that limits how many requests run at once (vLLM + the fusedkv_vllm plugin, CPU or GPU).

    .venv/bin/python tools/bench_serving.py [--requests 24] [--prompt-len 192] [--output-len 32]

1. Builds one seeded random-weight export per variant of one shape (this environment, the
   project's export writer), 2. runs them one after the other in one vLLM process of the
   serving environment (tools/serve_env.sh) with the same `kv_cache_memory_bytes`, sized so
   that vanilla holds `--vanilla-concurrency` requests, 3. prints per variant the KV capacity
   the engine sized (tokens), output tokens/s, mean and p50 TTFT of the batch, TTFT of one
   request alone (prefill cost, best of 3), and the ratios to vanilla.
All requests are submitted at once; `max_num_seqs` is large, so the cache is what limits the
running batch. Random weights: the numbers are about cache and compute, not text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("vanilla", "cla", "yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")
BLOCK = 32


def shape(args) -> dict:
    return dict(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=False,
    )


def build_exports(args, root: Path) -> dict[str, str]:
    import torch
    from transformers import Qwen3Config

    from fusedkv_megatron.hf.configuration_fusedkv import FusedKVConfig
    from fusedkv_megatron.hf.convert import write_hf_weights
    from fusedkv_megatron.hf.modeling_fusedkv import FusedKVForCausalLM

    out = {}
    for variant in args.variants:
        fused = FusedKVConfig(kv_sharing=variant, **shape(args))
        torch.manual_seed(0)
        model = FusedKVForCausalLM(fused).eval()
        cfg = fused
        if variant == "vanilla":
            cfg = Qwen3Config(**shape(args))
            cfg.architectures = ["Qwen3ForCausalLM"]
        else:
            cfg.architectures = ["FusedKVForCausalLM"]
        (root / variant).mkdir(parents=True)
        write_hf_weights(cfg, dict(model.state_dict()), root / variant, torch.float32)
        out[variant] = str(root / variant)
    return out


def cache_bytes(args) -> int:
    """The budget: `vanilla_concurrency` whole requests of a vanilla model (blocks rounded up)."""
    per_token = args.layers * 2 * args.heads * args.head_dim * 4  # fp32 K and V, every layer
    blocks = -(-(args.prompt_len + args.output_len) // BLOCK) * args.vanilla_concurrency
    return blocks * BLOCK * per_token


# ----------------------------------------------------------------------------- serving venv side
def worker(job_file: str, out_file: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_file).read_text())
    if job["top_prefill"]:  # read by the plugin when it builds each model
        os.environ["FUSEDKV_VLLM_TOP_PREFILL"] = "1"
    results = {}
    for variant, model in job["exports"].items():
        llm = LLM(model=model, dtype="float32", skip_tokenizer_init=True, seed=0,
                  enforce_eager=True, block_size=BLOCK, max_model_len=job["max_model_len"],
                  max_num_seqs=256, max_num_batched_tokens=job["batch_tokens"],
                  enable_prefix_caching=False, disable_log_stats=False,
                  kv_cache_memory_bytes=job["kv_cache_bytes"])  # fmt: skip
        cfg = llm.llm_engine.vllm_config.cache_config
        params = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True,
                                detokenize=False)  # fmt: skip
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        one = SamplingParams(max_tokens=1, detokenize=False)
        llm.generate(prompts[:1], one, use_tqdm=False)  # warm-up
        # Prefill alone: one request at a time, best of 3 (distinct prompts, no prefix cache).
        single = min(llm.generate([p], one, use_tqdm=False)[0].metrics.first_token_latency
                     for p in prompts[1:4])  # fmt: skip
        best = None  # the fastest of `rounds` identical batches (a shared machine is noisy)
        for _ in range(job["rounds"]):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            if best is None or wall < best[0]:
                best = (wall, outs)
        wall, outs = best
        ttft = sorted(o.metrics.first_token_latency for o in outs)
        results[variant] = dict(
            capacity_tokens=int(cfg.num_gpu_blocks) * int(cfg.block_size),
            output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
            wall_s=wall,
            ttft_mean_s=sum(ttft) / len(ttft),
            ttft_p50_s=ttft[len(ttft) // 2],
            ttft_single_s=single,
        )
        print(f"[bench_serving] {variant}: {results[variant]}", flush=True)
        del llm
    Path(out_file).write_text(json.dumps(results))
    return 0


# ----------------------------------------------------------------------------- report
def report(results: dict, args) -> str:
    base = results["vanilla"]
    lines = [
        f"{'variant':<24}{'KV tokens':>10}{'x':>6}{'tok/s':>9}{'x':>6}{'TTFT mean':>11}"
        f"{'x':>6}{'TTFT p50':>10}{'x':>6}{'TTFT alone':>12}{'x':>6}"
    ]
    for variant, r in results.items():
        tput, base_tput = r["output_tokens"] / r["wall_s"], base["output_tokens"] / base["wall_s"]
        lines.append(
            f"{variant:<24}{r['capacity_tokens']:>10}{r['capacity_tokens'] / base['capacity_tokens']:>6.2f}"
            f"{tput:>9.1f}{tput / base_tput:>6.2f}{r['ttft_mean_s']:>10.2f}s"
            f"{r['ttft_mean_s'] / base['ttft_mean_s']:>6.2f}{r['ttft_p50_s']:>9.2f}s"
            f"{r['ttft_p50_s'] / base['ttft_p50_s']:>6.2f}"
            f"{r['ttft_single_s'] * 1e3:>10.1f}ms{r['ttft_single_s'] / base['ttft_single_s']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=192)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--vanilla-concurrency", type=int, default=4,
                   help="requests a vanilla model's cache holds at once (sets the budget)")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="batches per variant; the fastest counts")
    p.add_argument("--top-prefill", action="store_true",
                   help="serve with FUSEDKV_VLLM_TOP_PREFILL=1 (top half on the logit rows only)")  # fmt: skip
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if "vanilla" not in args.variants:
        args.variants.insert(0, "vanilla")
    import torch

    serve_py = subprocess.run(["bash", "-c", 'source tools/serve_env.sh >&2 && echo "$SERVE_PY"'],
                              cwd=REPO, check=True, capture_output=True, text=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 512, (args.requests, args.prompt_len), generator=g).tolist()
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        root = Path(tmp)
        job = dict(exports=build_exports(args, root), prompts=prompts, output_len=args.output_len,
                   kv_cache_bytes=cache_bytes(args), batch_tokens=args.batch_tokens, rounds=args.rounds,
                   top_prefill=args.top_prefill,
                   max_model_len=args.prompt_len + args.output_len)  # fmt: skip
        (root / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_NO_USAGE_STATS="1")
        # VLLM_CPU_KVCACHE_SPACE (whole GiB) would override kv_cache_memory_bytes on CPU.
        for key in ("PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE"):
            env.pop(key, None)
        subprocess.run([serve_py.stdout.strip().splitlines()[-1], __file__, "--worker",
                        str(root / "job.json"), str(root / "out.json")], env=env,
                       check=True, stdout=sys.stderr)  # fmt: skip
        results = json.loads((root / "out.json").read_text())
    print(f"shape: {args.layers} layers, hidden {args.hidden}, {args.heads} heads x {args.head_dim}, "
          f"fp32; {args.requests} requests of {args.prompt_len}+{args.output_len} tokens at once "
          f"(fastest of {args.rounds} batches); "
          f"KV budget {job['kv_cache_bytes'] / 2**20:.1f} MiB (vanilla holds "
          f"{args.vanilla_concurrency} requests); top-half prefill "
          f"{'on' if args.top_prefill else 'off'}")  # fmt: skip
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
