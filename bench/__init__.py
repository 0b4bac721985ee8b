"""Benchmarks that print comparable figures; results go in docs/benchmarks.md."""
