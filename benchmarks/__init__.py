"""Speed measurements (run from the repo root: `python -m benchmarks.<name>`); never asserted in tests."""
