"""Simulated users, the experiment runner, privacy attacks, reports and benchmarks."""
