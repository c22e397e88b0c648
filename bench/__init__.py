"""The benchmark of issue 8: ``python -m bench`` (``make bench``); see docs/benchmarks.md."""
