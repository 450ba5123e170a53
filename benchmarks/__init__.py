"""Benchmarks of llamafleet's services (run on the machines they describe)."""
