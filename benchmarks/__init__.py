"""Speed and comparison benchmarks: `python -m benchmarks.NAME` from the repository root."""
