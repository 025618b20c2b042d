"""Benchmark harness for the gateway (issue 8): run ``python bench/run.py``; see README.md."""
