"""lm-evaluation-harness on FusedKV checkpoints and exports (`fusedkv-eval`, cli.py), and the
package's offline perplexity task on its held-out text (tasks/)."""

from .cli import EvalError, evaluate, main

__all__ = ["EvalError", "evaluate", "main"]
