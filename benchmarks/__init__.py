"""Benchmarks of the routing blocks, the data path, trial start-up and sweep overhead: run each from the
repository root as ``python -m benchmarks.<name>`` (BENCHMARKS.md)."""
