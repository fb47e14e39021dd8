"""Benchmarks: side-by-side ratios measured in one run (python -m fedpal.simulations.benchmarks.<name>)."""
