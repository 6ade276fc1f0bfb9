"""How much of the GPU's bf16 peak a GEMM reaches, by its size: the compute part of the step
time.

A GEMM of m x k by k x n (m tokens of one microbatch, k and n the weight's widths on one TP
rank) runs at

    efficiency(m, k, n) = ceiling * g(m) * g(k) * g(n),   g(x) = x / (x + knee)

the shape NVIDIA's GEMM performance guide describes (Deep Learning Performance Documentation,
"Matrix Multiplication Background User's Guide": throughput grows with every dimension until
the GPU's SMs are full, small dimensions leave them idle through tile and wave quantization).
Each factor is 1/2 at the knee and approaches 1 for dimensions well above it. The constants are
assumptions, not measurements here: knee = 256 (one or two 128-wide tiles per SM row), and a
ceiling of 0.6, chosen so that the paper's 1.5B layout (h = 2048, 8192 tokens a microbatch)
lands at Megatron-LM's published model-FLOPs utilisation for GPT models on H100 (41-47%,
Megatron-LM README, "Performance benchmarking"). Attention's model FLOPs (full s x s, as
Megatron-LM counts them) run at `attention` = 0.6 of the peak: a flash kernel computes only the
causal half, at about 30% of the peak for forward plus backward (FlashAttention-2/3 papers,
Dao 2023 arXiv 2307.08691, Shah et al. 2024 arXiv 2407.08608, report 35-75% forward and less
backward on H100). Memory-bound work (norms, RoPE, SwiGLU, residual adds) is not timed
separately: the ceiling absorbs it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Efficiency:
    ceiling: float = 0.6  # share of the bf16 peak a large GEMM sustains inside a training step
    knee: float = 256.0  # a GEMM dimension that halves the efficiency
    attention: float = 0.6  # attention model FLOPs per second / peak

    def gemm(self, m: int, k: int, n: int) -> float:
        """Share of the peak a GEMM of m x k by k x n reaches."""
        g = 1.0
        for x in (m, k, n):
            g *= x / (x + self.knee)
        return self.ceiling * g

    def check(self) -> None:
        if not 0 < self.ceiling <= 1:
            raise ValueError(
                f"GEMM efficiency ceiling={self.ceiling} must be in (0, 1], e.g. 0.6 for 60% of "
                "the bf16 peak"
            )
        if not 0 < self.attention <= 1:
            raise ValueError(f"attention efficiency={self.attention} must be in (0, 1]")
        if self.knee < 0:
            raise ValueError(f"GEMM knee={self.knee} must be >= 0")


__all__ = ["Efficiency"]
