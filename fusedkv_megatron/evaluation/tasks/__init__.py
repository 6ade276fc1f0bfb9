"""lm-eval tasks shipped with the package: fusedkv_heldout.yaml (perplexity on the embedded
held-out text) and heldout.py, the functions its YAML names. fusedkv-eval passes this directory
to lm-eval's TaskManager as an include path."""
