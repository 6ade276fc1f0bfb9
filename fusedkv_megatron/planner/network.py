"""How fast GPUs talk: per-GPU bandwidth inside a node and between nodes, and the latency of
one step of a collective. A `Network` is an assumption about the machine, not a measurement;
`fusedkv-plan` takes every field as a flag (--nvlink-gbps, --network-gbps, ...).

Defaults per GPU kind, bandwidths in GB/s per GPU per direction:
- H100 / H200 / GH200 SXM: NVLink 4 at 900 GB/s per GPU in total (18 links x 50 GB/s, both
  directions: 450 each way; NVIDIA H100 and H200 data sheets), NVSwitch inside an 8-GPU node;
  between nodes one 400 Gb/s NIC per GPU (ConnectX-7 NDR InfiniBand, as in DGX H100/H200:
  50 GB/s each way).
- H800: NVLink at 400 GB/s in total (200 each way); 400 Gb/s per GPU.
- A100 / A800 SXM: NVLink 3 at 600 GB/s in total (300 each way); 200 Gb/s HDR per GPU (DGX
  A100: 25 GB/s).
- B200 / GB200: NVLink 5 at 1.8 TB/s in total (900 each way); 400 Gb/s per GPU (DGX B200).
Any other kind gets the H100 SXM figures, and the report says they were assumed.

`efficiency` is the share of the link rate a large NCCL collective reaches as bus bandwidth
(nccl-tests' "busbw"); 0.8 is an allowance (NCCL's own performance notes put ring all-reduce
bus bandwidth at 75-90% of the link rate for large messages), not measured here. Latencies are
per ring step: ~5 us inside a node over NVLink, ~10 us across InfiniBand (the order NCCL's
tuning model uses), again assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    intra_gbps: float = 450.0  # GB/s per GPU per direction inside a node (NVLink)
    inter_gbps: float = 50.0  # GB/s per GPU per direction between nodes (400 Gb/s NIC)
    efficiency: float = 0.8  # bus bandwidth a large collective reaches / link rate
    intra_latency_us: float = 5.0  # per ring step
    inter_latency_us: float = 10.0
    hbm_gbps: float = 3350.0  # memory bandwidth (the optimizer step): H100 SXM 3.35 TB/s
    assumed: bool = False  # the kind has no row here: the H100 SXM figures were used

    def bandwidth(self, crosses_nodes: bool) -> float:
        """Bus bandwidth in bytes/s of a collective inside a node or across nodes."""
        gbps = self.inter_gbps if crosses_nodes else self.intra_gbps
        return gbps * 1e9 * self.efficiency

    def latency(self, crosses_nodes: bool) -> float:
        return (self.inter_latency_us if crosses_nodes else self.intra_latency_us) * 1e-6

    def check(self) -> None:
        for name in ("intra_gbps", "inter_gbps", "hbm_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (GB/s per GPU)")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"network efficiency={self.efficiency} must be in (0, 1]")
        if self.intra_latency_us < 0 or self.inter_latency_us < 0:
            raise ValueError("network latencies must be >= 0 microseconds")


_H100 = Network()
NETWORKS = {
    "H100": _H100,
    "H200": Network(hbm_gbps=4800.0),  # H200 SXM: 4.8 TB/s HBM3e
    "GH200": Network(hbm_gbps=4000.0),
    "H800": Network(intra_gbps=200.0),
    "A100": Network(intra_gbps=300.0, inter_gbps=25.0, hbm_gbps=2039.0),
    "A800": Network(intra_gbps=200.0, inter_gbps=25.0, hbm_gbps=2039.0),
    "B200": Network(intra_gbps=900.0, hbm_gbps=8000.0),
    "GB200": Network(intra_gbps=900.0, hbm_gbps=8000.0),
}


def network_for(gpu_kind: str) -> Network:
    """The default network of a GPU kind (H100 SXM figures, marked assumed, for others)."""
    found = NETWORKS.get(gpu_kind)
    if found is not None:
        return found
    return Network(assumed=True)


__all__ = ["NETWORKS", "Network", "network_for"]
