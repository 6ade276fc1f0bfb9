"""Research tooling: compare training runs side by side, and read what a fusion probe learned.

- `events`: TensorBoard scalars of a run, merged over the event files of its resumed processes.
- `compare` (`fusedkv-compare`): a Markdown report and loss/fusion plots of several runs.
- `probe` (`fusedkv-probe-report`): heatmaps of learned fusion weights per (top, source) layer.

Importing this package does nothing: the modules are imported by the console scripts. Plots
need matplotlib (`pip install fusedkv_megatron[research]`); none of this imports Megatron
except `probe` when it reads a torch_dist checkpoint. See docs/research.md.
"""
