"""Benchmarks that print one JSON line each (``python -m sae.benchmarks.<name>``)."""
