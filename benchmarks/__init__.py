"""Reproducible benchmarks of klein-batch against the alternatives; ``python -m benchmarks.run``."""
