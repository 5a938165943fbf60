"""Benchmarks for forwarder: `python -m bench.run` (see bench/README.md)."""
