"""Benchmarks: `make bench` (python -m benchmarks) runs them and writes BENCHMARKS.md."""
